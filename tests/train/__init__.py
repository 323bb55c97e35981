"""Tests of the ViT-PEFT continual trainer, aepg_kernels.train."""
