"""Fused Triton kernels for FNE (import name `fne_kernels`): the sampler and the posterior-weighted InfoNCE.

`triton_sample` and `triton_posterior_infonce` are imported on first use, so that importing this package needs no
Triton. To run the kernels on the CPU (tests), set TRITON_INTERPRET=1 before the first use: Triton reads it when
the modules holding the @triton.jit functions (`fne_kernels.fne_sampler`, `fne_kernels.fne_infonce`) are imported.
"""

__all__ = ["triton_sample", "triton_posterior_infonce"]


def __getattr__(name):
    if name == "triton_sample":
        from fne_kernels.fne_sampler import triton_sample

        return triton_sample
    if name == "triton_posterior_infonce":
        from fne_kernels.fne_infonce import triton_posterior_infonce

        return triton_posterior_infonce
    raise AttributeError(f"module 'fne_kernels' has no attribute {name!r}")
