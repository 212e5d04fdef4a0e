"""`fne-bench infonce`: forward + backward of the posterior-weighted InfoNCE against the three bare matmuls it needs.

Implementations (`fne_dist.infonce.posterior_infonce`): `triton` (the fused kernels), `torch` (streaming tiles),
`dense` (the [b, N] autograd reference) and `matmul`: anchors @ keys.T for the forward, and for the backward the
same product again and P @ keys (P [b, N] of the keys' dtype): the floor of any implementation that never stores
[b, N] between the passes (attention kernels recompute it in the backward as this one does).  Every case is one
forward and one backward into the anchors and the logit scale, with the posterior on (statistics ready), 1%
invalid slots and the inputs of `fne-bench sampler`.

Timing and memory as `fne-bench sampler` (GPU: CUDA events after warm-up; CPU: a fresh process per case, the median
wall clock on torch's default threads).  Writes `{prefix}results.csv` (the sampler's columns; mode `posterior`,
regime `fwd+bwd`), `{prefix}time.png` and `{prefix}ratio.png` to --out.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from fne_kernels.bench_sampler import (DTYPES, add_case_arguments, finish_case_arguments, make_inputs, measure_cases,
                                       run_and_report, time_cpu, time_gpu)

IMPLS = ("triton", "torch", "dense", "matmul")
GPU_DEFAULTS = dict(b=[4096], n=[1 << 16, 1 << 18, 1 << 20], d=[512], impl=list(IMPLS), dtype="bf16",
                    repeats=10)
CPU_DEFAULTS = dict(b=[1024], n=[65536], d=[256], impl=["dense", "torch", "matmul"], dtype="fp32", repeats=3)


def build_case(impl: str, b: int, n: int, d: int, dtype: torch.dtype, device: str):
    """The inputs of one case and a no-argument callable running its forward and backward once."""
    from fne_dist.infonce import CandidateSet, dense_posterior_infonce, posterior_infonce
    from fne_dist.weights import FNEConfig

    anchors, keys, _, anchor_ids, key_ids, valid, stats = make_inputs(b, n, d, dtype, device)
    g = torch.Generator(device=device).manual_seed(1)
    pos_keys = torch.nn.functional.normalize(anchors.float() + torch.randn(b, d, device=device, generator=g) / d**0.5,
                                             dim=1).to(dtype)
    labels = torch.randint(-1, 100, (n,), device=device, generator=g)
    cand = CandidateSet(keys, key_ids, labels, valid, anchor_ids, torch.randint(0, 100, (b,), device=device,
                                                                                   generator=g))
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    anchors.requires_grad_()
    cfg = FNEConfig(mode="bayes")
    if impl == "matmul":
        def run():
            s = anchors.detach() @ keys.T  # forward
            s = anchors.detach() @ keys.T  # backward: the recomputed product, then P @ keys
            return s @ keys
    elif impl == "dense":
        def run():
            dense_posterior_infonce(anchors, scale, pos_keys, cand, stats, cfg).sum().backward()
    else:
        def run():
            posterior_infonce(anchors, scale, pos_keys, cand, stats, cfg, impl=impl)[0].sum().backward()
    return run


def run_cases(args) -> list[dict]:
    dtype = DTYPES[args.dtype]

    def measure(impl, b, n, d):
        build = functools.partial(build_case, impl, b, n, d, dtype, args.device)
        return time_gpu(build, args.warmup, args.repeats) if args.device == "cuda" else time_cpu(build, args.repeats)

    return measure_cases(args, measure, dict(mode="posterior", regime="fwd+bwd", tile="-"))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fne-bench infonce", description=__doc__.splitlines()[0])
    add_case_arguments(parser, GPU_DEFAULTS, CPU_DEFAULTS, IMPLS, warmup=2, out=Path("runs/bench_infonce"))
    return finish_case_arguments(parser, parser.parse_args(argv), GPU_DEFAULTS, CPU_DEFAULTS)


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_args(argv), run_cases)


if __name__ == "__main__":
    main()
