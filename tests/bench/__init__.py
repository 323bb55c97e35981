"""Tests of the benchmark harness, aepg_kernels.bench."""
