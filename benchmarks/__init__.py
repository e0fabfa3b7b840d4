"""Speed and quality measurements (``python -m benchmarks.<name>``); never timed tests."""
