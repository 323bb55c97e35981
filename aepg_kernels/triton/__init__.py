"""Triton backend: fused forward (one pass per row), recompute backward, in-place grad scale."""
from .launch import CONFIG, TileConfig, backward, fits_on_chip, forward, scale_

__all__ = ["CONFIG", "TileConfig", "backward", "fits_on_chip", "forward", "scale_"]
