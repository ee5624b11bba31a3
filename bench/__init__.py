"""Benchmark harness: the pipeline against TensorFlow's tutorial recipe."""
