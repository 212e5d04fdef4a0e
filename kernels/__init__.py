"""Fused Triton kernels for FNE (import name `fne_kernels`): the sampler and the posterior-weighted InfoNCE's partials.

`triton_sample` (`fne_dist.fne.sample_negatives` with impl "triton") and `triton_lse_partials` /
`triton_pull_partials` (one candidate run's forward and backward partials, which `fne_dist.infonce` combines with
impl "triton": `fne_dist.infonce.posterior_infonce(..., impl="triton")` is the fused loss) are imported on first
use, so that importing this package needs no Triton. To run the kernels on the CPU (tests), set TRITON_INTERPRET=1
before the first use: Triton reads it when the modules holding the @triton.jit functions (`fne_kernels.fne_sampler`,
`fne_kernels.fne_infonce`) are imported.
"""

__all__ = ["triton_sample", "triton_lse_partials", "triton_pull_partials"]


def __getattr__(name):
    if name == "triton_sample":
        from fne_kernels.fne_sampler import triton_sample

        return triton_sample
    if name in ("triton_lse_partials", "triton_pull_partials"):
        from fne_kernels import fne_infonce

        return getattr(fne_infonce, name)
    raise AttributeError(f"module 'fne_kernels' has no attribute {name!r}")
