"""Fused Triton kernels for FNE (import name `fne_kernels`)."""
