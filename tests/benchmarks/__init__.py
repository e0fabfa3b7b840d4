"""Tests of the benchmarks' pure pieces."""
