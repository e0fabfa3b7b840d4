"""Tests of :mod:`sampler`: TensorFlow parity, a float64 NumPy reference, samplers, losses."""
