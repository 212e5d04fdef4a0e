"""`fne-bench sampler`: time and peak memory of the negative samplers against a bare matmul of the same shapes.

Implementations: `triton` (the fused kernel), `torch` (streaming tiles), `dense` (the [B, N] reference) and
`matmul` (anchors @ keys.T alone: the floor any sampler must pay).  Every case draws from the full FNE rule
(official mode by default, global cut-down, statistics ready, 1% invalid slots).  `--fallback` benchmarks the
many-fallback regime: the global cut-down sits above every similarity, so every row has weight 0 and takes its
hardest candidate.

GPU: medians of CUDA-event timings after warm-up; peak memory = torch.cuda.max_memory_allocated during the
calls minus what was allocated before (inputs included in neither).  A case that runs out of memory is
reported as OOM.  CPU: each case runs in a fresh process; its extra memory is the peak resident set of the
first call (the kernel's high-water mark, /proc/self/clear_refs reset once the inputs exist) minus the
resident set before it, and its time the median wall clock of the calls after that one, on torch's
default number of threads (set OMP_NUM_THREADS to choose; the table records it).

Writes `{prefix}results.csv`, `{prefix}time.png` (time against N per implementation) and `{prefix}ratio.png`
(time / matmul) to --out.  `--device cpu --impl triton` runs the kernel in Triton's interpreter when
TRITON_INTERPRET=1 is set (slow: tiny shapes only, to dry-run scripts).
"""
from __future__ import annotations

import argparse
import csv
import functools
import gc
import itertools
import multiprocessing
import os
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from fne_dist.weights import MODES

IMPLS = ("triton", "torch", "dense", "matmul")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_DEFAULTS = dict(b=[256, 1024, 4096], n=[1 << 16, 1 << 18, 1 << 20], d=[256, 512, 1024], impl=list(IMPLS),
                    dtype="bf16", repeats=20)
CPU_DEFAULTS = dict(b=[1024], n=[131072], d=[256], impl=["dense", "torch", "matmul"], dtype="fp32", repeats=3)
FIELDS = ("device", "threads", "dtype", "b", "n", "d", "mode", "regime", "tile", "impl", "time_ms", "peak_mib",
          "x_matmul", "status")


def make_inputs(b: int, n: int, d: int, dtype: torch.dtype, device: str, fallback: bool = False, seed: int = 0):
    """Unit-norm features, positive similarities, ids with some same-id pairs, 1% invalid slots, ready stats
    (`fallback`: with mu+ - margin above every similarity, so every row falls back)."""
    from fne_dist.fne import SimilarityStats

    g = torch.Generator(device=device).manual_seed(seed)
    anchors = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=g), dim=1).to(dtype)
    keys = torch.empty(n, d, device=device, dtype=dtype)
    for start in range(0, n, 1 << 16):  # normalise in chunks: no fp32 copy of all the keys at once
        chunk = torch.randn(min(1 << 16, n - start), d, device=device, generator=g)
        keys[start:start + chunk.shape[0]] = torch.nn.functional.normalize(chunk, dim=1).to(dtype)
    pos_sims = 0.3 + 0.4 * torch.rand(b, device=device, generator=g)
    anchor_ids = torch.randint(0, 4 * n, (b,), device=device, generator=g)
    key_ids = torch.randint(0, 4 * n, (n,), device=device, generator=g)
    valid = torch.rand(n, device=device, generator=g) > 0.01
    # similarities of random unit vectors are ~N(0, 1/d): mu+ - margin = 0 keeps about half the candidates
    stats = SimilarityStats.from_moments(count_pos=1000, mean_pos=2.0 if fallback else 0.2, var_pos=0.01, mean_neg=0.0,
                                         var_neg=2.0 / d, device=device)
    return anchors, keys, pos_sims, anchor_ids, key_ids, valid, stats


def runner(impl: str, inputs, tile_size: int | None, mode: str = "official"):
    """A no-argument callable running `impl` once on `inputs`."""
    from fne_dist.fne import FNEConfig, sample_negatives

    anchors, keys, pos_sims, anchor_ids, key_ids, valid, stats = inputs
    if impl == "matmul":
        return lambda: torch.matmul(anchors, keys.T)
    cfg = FNEConfig(mode=mode)
    return lambda: sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, stats, cfg, seed=0, valid=valid,
                                    impl=impl, tile_size=tile_size)


def build_case(impl, b, n, d, dtype, device, tile_size, mode, fallback):
    """The no-argument callable of one case, inputs made (a picklable `build` for `time_gpu` / `time_cpu`)."""
    return runner(impl, make_inputs(b, n, d, dtype, device, fallback), tile_size, mode)


def time_gpu(build, warmup: int, repeats: int) -> dict:
    """Median CUDA-event time and peak extra memory of `build()`'s callable in this process (the inputs that
    `build` makes count in neither); OOM is a result."""
    run = None
    try:
        run = build()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() - base
        return {"time_ms": statistics.median(times), "peak_mib": peak / 2**20, "status": "ok"}
    except torch.cuda.OutOfMemoryError:
        return {"time_ms": None, "peak_mib": None, "status": "OOM"}
    finally:
        run = None
        gc.collect()
        torch.cuda.empty_cache()


def measure_gpu(impl, b, n, d, dtype, warmup, repeats, tile_size, mode, fallback) -> dict:
    return time_gpu(functools.partial(build_case, impl, b, n, d, dtype, "cuda", tile_size, mode, fallback), warmup,
                    repeats)


def _resident_kib() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v) for k, v in re.findall(r"(VmHWM|VmRSS):\s+(\d+) kB", f.read())}


def _cpu_case(build, repeats) -> dict:
    """Runs in a fresh process: the first call's peak extra resident memory, then the median time of `repeats`."""
    try:
        run = build()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        before = _resident_kib()["VmRSS"]
        run()
        peak = _resident_kib()["VmHWM"] - before
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        return {"time_ms": statistics.median(times), "peak_mib": peak / 1024, "status": "ok",
                "threads": torch.get_num_threads()}
    except MemoryError:
        return {"time_ms": None, "peak_mib": None, "status": "OOM"}


def time_cpu(build, repeats: int) -> dict:
    """One fresh process per case (`build` must pickle), so that neither the allocator's cache nor another case's
    peak leaks in; the memory-measured first call is the warm-up.  A process killed for memory counts as OOM."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_cpu_case, build, repeats).result()
        except BrokenProcessPool:
            return {"time_ms": None, "peak_mib": None, "status": "OOM"}


def measure_cpu(impl, b, n, d, dtype, warmup, repeats, tile_size, mode, fallback) -> dict:
    return time_cpu(functools.partial(build_case, impl, b, n, d, dtype, "cpu", tile_size, mode, fallback), repeats)


def use_blocks(text: str, dtype: torch.dtype) -> str:
    """--blocks: the fused kernel's launch config for this dtype in this process (replaces its entry of
    `fne_sampler.GPU_CONFIGS`, the tuning table); returns its label for the table's tile column."""
    from fne_kernels import fne_sampler

    blocks = fne_sampler.Blocks.parse(text)
    fne_sampler.GPU_CONFIGS[dtype.itemsize] = blocks
    return str(blocks)


def measure_cases(args, measure, columns: dict) -> list[dict]:
    """Every shape (b, n, d) of args under every impl (shared with fne_kernels.bench_infonce): one row each of the
    case, `columns` (mode, regime, tile) and measure(impl, b, n, d)'s result, printed as it comes, with its time
    against the shape's matmul row (x_matmul)."""
    rows = []
    for b, n, d in itertools.product(args.b, args.n, args.d):
        case = []
        for impl in args.impl:
            case.append({"device": args.device, "dtype": args.dtype, "b": b, "n": n, "d": d, **columns, "impl": impl,
                         **measure(impl, b, n, d)})
            print(format_row(case[-1]), flush=True)
        floor = next((r["time_ms"] for r in case if r["impl"] == "matmul" and r["time_ms"]), None)
        for r in case:
            r["x_matmul"] = r["time_ms"] / floor if floor and r["time_ms"] else None
        rows += case
    return rows


def run_cases(args) -> list[dict]:
    measure = measure_gpu if args.device == "cuda" else measure_cpu
    dtype = DTYPES[args.dtype]
    tile = use_blocks(args.blocks, dtype) if args.blocks else args.tile_size or "-"
    columns = dict(mode=args.mode, regime="fallback" if args.fallback else "typical", tile=tile)
    return measure_cases(args, lambda impl, b, n, d: measure(impl, b, n, d, dtype, args.warmup, args.repeats,
                                                            args.tile_size, args.mode, args.fallback), columns)


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_row(r: dict) -> str:
    return (f"{r['device']:>6} {_fmt(r.get('threads'), '>7')} {r['dtype']:>5} {r['b']:>6} {r['n']:>9} {r['d']:>6} "
            f"{r['mode']:>9} {r['regime']:>8} {r['tile']:>5} {r['impl']:>7} "
            f"{_fmt(r['time_ms'], '12.2f')} {_fmt(r['peak_mib'], '10.1f')} {_fmt(r.get('x_matmul'), '9.2f')} "
            f"{r['status']:>6}")


def print_table(rows: list[dict]) -> None:
    print(f"{'device':>6} {'threads':>7} {'dtype':>5} {'b':>6} {'n':>9} {'d':>6} {'mode':>9} {'regime':>8} {'tile':>5} "
          f"{'impl':>7} {'time_ms':>12} {'peak_MiB':>10} {'x_matmul':>9} {'status':>6}")
    for r in rows:
        print(format_row(r))


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in FIELDS} for r in rows)


def plot(rows: list[dict], out: Path, prefix: str = "") -> None:
    """{prefix}time.png and {prefix}ratio.png: one panel per (b, d), N on the x axis, one line per implementation
    (and tile, regime where they vary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["b"], r["d"]) for r in rows})
    for name, key, label in (("time.png", "time_ms", "median time (ms)"), ("ratio.png", "x_matmul", "time / matmul")):
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
        for ax, (b, d) in zip(axes[0], panels):
            for line in dict.fromkeys(_line(r) for r in rows):
                pts = sorted((int(r["n"]), float(r[key])) for r in rows
                             if (r["b"], r["d"], _line(r)) == (b, d, line) and r[key])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=line)
            ns = sorted({r["n"] for r in rows if (r["b"], r["d"]) == (b, d)})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
            ax.set(xlabel="N candidates", ylabel=label, title=f"b={b}, D={d}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}", dpi=120)
        plt.close(fig)


def _line(r: dict) -> str:
    """A plot line's label: the implementation, with its tile and regime where not the default."""
    tile = "" if r.get("tile") in (None, "-", "") else f" tile {r['tile']}"
    regime = "" if r.get("regime") in (None, "typical") else f" {r['regime']}"
    return f"{r['impl']}{tile}{regime}"


def add_case_arguments(parser, gpu: dict, cpu: dict, impls, *, warmup: int, out: Path) -> None:
    """The arguments of every kernel benchmark (shared with fne_kernels.bench_infonce): device, shapes, impls, dtype,
    repeats, warm-up, output folder and prefix.  `gpu` and `cpu`: the benchmark's defaults per device (b, n, d, impl,
    dtype, repeats), which the help texts name and `finish_case_arguments` fills in."""
    def text(value, powers=False):
        if not isinstance(value, list):
            return str(value)
        if value == list(impls):
            return "all"
        return " ".join(f"2^{v.bit_length() - 1}" if powers and v & (v - 1) == 0 else str(v) for v in value)

    def defaults(key, powers=False):
        return f"GPU default {text(gpu[key], powers)}; CPU {text(cpu[key])}"

    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--b", type=int, nargs="+", help=f"anchors per call ({defaults('b')})")
    parser.add_argument("--n", type=int, nargs="+", help=f"candidates ({defaults('n', powers=True)})")
    parser.add_argument("--d", type=int, nargs="+", help=f"feature width ({defaults('d')})")
    parser.add_argument("--impl", nargs="+", choices=impls, help=defaults("impl"))
    parser.add_argument("--dtype", choices=tuple(DTYPES), help=f"feature dtype ({defaults('dtype')})")
    parser.add_argument("--repeats", type=int, help=f"timed calls per case ({defaults('repeats')})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help="untimed calls first (GPU; on the CPU the first call is)")
    parser.add_argument("--out", type=Path, default=out, help="folder for results.csv and plots")
    parser.add_argument("--prefix", default="", help="prefix of the written file names (e.g. device and date)")


def finish_case_arguments(parser, args, gpu: dict, cpu: dict):
    """The device's defaults where a case argument was not given; one usage error if the device cannot run the
    asked impls.  Returns args."""
    for key, value in (gpu if args.device == "cuda" else cpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_device(parser, args)
    return args


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fne-bench sampler", description=__doc__.splitlines()[0])
    add_case_arguments(parser, GPU_DEFAULTS, CPU_DEFAULTS, IMPLS, warmup=3, out=Path("runs/bench_sampler"))
    parser.add_argument("--tile-size", type=int, help="candidate tile of the torch and triton impls (default: theirs)")
    parser.add_argument("--blocks", help="the triton kernel's launch config M,N,K,warps,stages[,maxnreg] on the GPU "
                        "(default: fne_sampler.GPU_CONFIGS); the table's tile column shows it")
    parser.add_argument("--mode", default="official", choices=MODES, help="FNEConfig.mode of the rule")
    parser.add_argument("--fallback", action="store_true", help="the many-fallback regime: every row falls back")
    args = parser.parse_args(argv)
    if args.blocks:
        from fne_kernels.fne_sampler import Blocks

        try:
            Blocks.parse(args.blocks)
        except ValueError as err:
            parser.error(f"--blocks: {err}")
    return finish_case_arguments(parser, args, GPU_DEFAULTS, CPU_DEFAULTS)


def check_device(parser, args) -> None:
    """The device can run the asked impls, else one usage error (shared with fne_kernels.bench_infonce)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here; use --device cpu")
    if args.device == "cpu" and "triton" in args.impl and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("the triton impl needs a CUDA GPU (or TRITON_INTERPRET=1 for a slow dry run at tiny shapes); "
                     "on the CPU compare dense, torch and matmul")


def run_and_report(args, run_cases) -> None:
    """Run the cases, print the table, write the CSV and the plots under args.out (shared with bench_infonce)."""
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_cases(args)
    print()
    print_table(rows)
    write_csv(rows, args.out / f"{args.prefix}results.csv")
    plot(rows, args.out, args.prefix)
    print(f"\nwrote {args.out}/{args.prefix}results.csv, {args.prefix}time.png, {args.prefix}ratio.png")


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_args(argv), run_cases)


if __name__ == "__main__":
    main()
