"""Fused Triton kernels for FNE (import name `fne_kernels`).

`triton_sample` is imported on first use, so that importing this package needs no Triton. To run the
kernels on the CPU (tests), set TRITON_INTERPRET=1 before the first use: Triton reads it when the module
holding the @triton.jit functions (`fne_kernels.fne_sampler`) is imported.
"""

__all__ = ["triton_sample"]


def __getattr__(name):
    if name == "triton_sample":
        from fne_kernels.fne_sampler import triton_sample

        return triton_sample
    raise AttributeError(f"module 'fne_kernels' has no attribute {name!r}")
