"""Benchmarks of issue 7: mapping quality, the EWC lambda trade-off, sequential fold-ins, speed, scale.

Run each as ``python -m benchmarks.<name> [--quick] [--out DIR]`` from the repository root;
``python -m benchmarks.results`` regenerates ``benchmarks/RESULTS.md`` from their outputs.
"""
