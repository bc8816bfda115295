"""Benchmarks and measurement commands: `python -m benchmarks.<name> --help`."""
