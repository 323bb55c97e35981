"""Tests of the Hugging Face integrations, aepg_kernels.integrations."""
