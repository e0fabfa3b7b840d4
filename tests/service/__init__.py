"""Tests of :mod:`service`: index, model, store, settings, and the API on a real uvicorn."""
