"""Compile the sampler kernels for an NVIDIA GPU on a machine without one, and report their resource use.

    python -m fne_kernels.compile_check [--arch 90] [--dtype bf16 ...] [--mode ...] [--cutdown ...]
    python -m fne_kernels.compile_check --kernel infonce [-b 4096] [-d 512]   # the posterior InfoNCE's kernels

Triton compiles ahead of time with its bundled ptxas, no driver needed.  This catches what the interpreter
cannot (type rules of the compiled path, e.g. the uint64 hash, and code generation failures) and prints per
variant of the main loop (`_fne_blocks_kernel`) and the pick kernel the registers per thread, the stack bytes, the
register spill stores, shared memory, whether the dot runs on wgmma and whether TMA (cp.async.bulk.tensor) appears,
at the shipped block sizes: how `fne_sampler.GPU_CONFIGS` was chosen; and the static size of the main loop
(`_loop_profile`: instructions per candidate tile outside the K loop, per K step, MUFU per tile), which the
epilogue's cost follows where the dot does not overlap it, and the column pieces the epilogue walks a tile in
(`fne_sampler.Blocks.halvings`).  `--keys` compiles the mixed case too
(keys of another dtype, cast tile by tile on load).  Launch-time specialisation is approximated: contiguous
features (unit inner strides), 16-byte aligned pointers, sizes divisible by 16.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile

import torch

from fne_dist.weights import CUTDOWNS, MODES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
POINTERS = {"pos_ptr": "*fp32", "aid_ptr": "*i64", "kid_ptr": "*i64", "valid_ptr": "*u8", "params_ptr": "*fp32",
            "out_key_ptr": "*fp32", "out_block_ptr": "*i32", "out_score_ptr": "*fp32", "out_sblock_ptr": "*i32",
            "out_surv_ptr": "*i32", "out_wsum_ptr": "*fp32",
            "key_ptr": "*fp32", "block_ptr": "*i32", "score_ptr": "*fp32", "sblock_ptr": "*i32", "surv_ptr": "*i32",
            "wsum_ptr": "*fp32", "index_ptr": "*i64", "fallback_ptr": "*u8", "survivors_ptr": "*i64",
            "weight_sum_ptr": "*fp32", "race_key_ptr": "*fp32", "fallback_score_ptr": "*fp32",
            "fallback_index_ptr": "*i64",
            # fne_infonce
            "alab_ptr": "*i64", "klab_ptr": "*i64", "scale_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32",
            "false_ptr": "*fp32", "lse_ptr": "*fp32", "pull_ptr": "*fp32"}
FLOATS = ("margin", "neg_tau2", "official_logit2", "keep_min")
ALIGNED_INTS = ("N", "D", "stride_am", "stride_kn")


def _compile(fn, types: dict, constants: dict, arch: int, num_warps: int, num_stages: int, maxnreg: int | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("constexpr" if name in constants else types.get(name, "i32")) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name in ALIGNED_INTS}
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   **({"maxnreg": maxnreg} if maxnreg else {})})


def _resources(kernel) -> dict:
    """Registers, stack bytes, register spill stores (STL in the SASS; a stack can also be a call frame) and static
    shared memory of the compiled kernel (from its cubin); wgmma / TMA use."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout))
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ptx = kernel.asm["ptx"]
    return {"regs": int(usage["REG"]), "stack": int(usage["STACK"]), "spills": len(re.findall(r"\bSTL\b", sass)),
            "local": int(usage["LOCAL"]), "shared": kernel.metadata.shared,
            "mma": "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma"),
            "tma": "yes" if "cp.async.bulk.tensor" in ptx else "no", **_loop_profile(sass)}


def _loop_profile(sass: str) -> dict:
    """Static instruction counts of the outermost loop (in the main loop's kernel: over candidate tiles):
    `tile_ops`, its instructions outside the inner (K) loops, i.e. the epilogue and tile set-up that run once per
    tile; `k_ops`, the inner loops' instructions per pass; `mufu`, the MUFU (exp2, rcp, log) instructions of
    `tile_ops`.  Divided by the candidates each thread holds they give the issue cost per candidate."""
    code = [(int(at, 16), text) for at, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = sorted(((int(target, 16), at) for at, text in code
                    for target in re.findall(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text) if int(target, 16) < at),
                   key=lambda span: span[0] - span[1])
    if not loops:
        return {"tile_ops": 0, "k_ops": 0, "mufu": 0}
    start, end = loops[0]
    inner = [(a, b) for a, b in loops[1:] if start <= a and b <= end]
    in_inner = lambda at: any(a <= at <= b for a, b in inner)  # noqa: E731
    body = [text for at, text in code if start <= at <= end and not in_inner(at)]
    return {"tile_ops": len(body), "k_ops": sum(1 for at, _ in code if in_inner(at)),
            "mufu": sum(1 for text in body if re.search(r"\bMUFU\.", text))}


def check(arch: int = 90, b: int = 4096, dtypes=tuple(DTYPES), modes=MODES, cutdowns=CUTDOWNS,
          key_dtype: str | None = None, blocks=None) -> list[dict]:
    """Compile the chosen (dtype, mode, cut-down, validity mask) variants of both kernels (the main loop for whole
    and partial last tiles) at the block sizes
    `triton_sample` uses for `b` anchors (or at `blocks`, a `fne_sampler.Blocks`); one row of resource use per
    kernel.  `key_dtype`: keys of that dtype (cast on load) instead of the anchors' dtype."""
    from fne_kernels import fne_sampler as fs

    rows = []
    for name, mode, cutdown, has_valid in itertools.product(dtypes, modes, cutdowns, (False, True)):
        dtype = DTYPES[name]
        keys = key_dtype or name
        config = blocks or fs._config(b, 1024, dtype, True, None)
        rule = dict(MODE=fs.MODE_CODES[mode], CUTDOWN=fs.CUTDOWN_CODES[cutdown], HAS_VALID=has_valid, FAST=True)
        types = {"a_ptr": f"*{name}", "k_ptr": f"*{keys}", **POINTERS, **{f: "fp32" for f in FLOATS}}
        variant = {"dtype": name if keys == name else f"{name}+{keys}", "mode": mode, "cutdown": cutdown,
                   "valid": has_valid}
        for even_n in (True, False):  # N a multiple of the tile (no column tests), or not
            constants = dict(stride_ak=1, stride_kk=1, **rule, EVEN_K=True, EVEN_N=even_n,
                             INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                             BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                             HALVINGS=config.halvings)
            kernel = _compile(fs._fne_blocks_kernel, types, constants, arch, config.num_warps, config.num_stages,
                              config.maxnreg)
            rows.append({"kernel": "blocks", **variant, "tiles": "whole" if even_n else "partial",
                         "blocks": str(config), **_resources(kernel), "pieces": 2 ** config.halvings})
        pick_r, pick_k = fs.PICK_BLOCKS
        kernel = _compile(fs._fne_pick_kernel, types, dict(stride_ak=1, stride_kk=1, **rule, BLOCK_R=pick_r,
                                                             BLOCK_K=pick_k), arch, 4, 1)
        rows.append({"kernel": "pick", **variant, "tiles": "-", "blocks": f"{pick_r}x{fs.SAMPLE_BLOCK}x{pick_k}/w4",
                     **_resources(kernel), "pieces": "-"})
    return rows


def check_infonce(arch: int = 90, b: int = 4096, d: int = 512, dtypes=tuple(DTYPES)) -> list[dict]:
    """Compile the posterior InfoNCE's forward and backward kernels (kernels/fne_infonce.py) at the block sizes
    `fne_infonce.configs` gives for `b` anchors of width `d`; one row of resource use per kernel."""
    from fne_kernels import fne_infonce as fi

    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        forward, backward, block_d = fi.configs(b, d, dtype, True)
        types = {"a_ptr": f"*{name}", "k_ptr": f"*{name}", **POINTERS}
        common = dict(stride_ak=1, stride_kk=1, EVEN_K=d % forward.block_k == 0,
                      INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32", FAST=True)
        for kernel_name, fn, blocks, extra, label in (
                ("infonce-fwd", fi._forward_kernel, forward, {}, str(forward)),
                ("infonce-bwd", fi._backward_kernel, backward, {"BLOCK_D": block_d}, f"{backward}/d{block_d}")):
            constants = dict(common, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, **extra)
            kernel = _compile(fn, types, constants, arch, blocks.num_warps, blocks.num_stages, blocks.maxnreg)
            rows.append({"kernel": kernel_name, "dtype": name, "d": d, "blocks": label, **_resources(kernel)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fne_kernels.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: H100/H200)")
    parser.add_argument("-b", type=int, default=4096, help="anchors per call (caps BLOCK_M)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cutdown", nargs="+", choices=CUTDOWNS, default=list(CUTDOWNS))
    parser.add_argument("--keys", choices=list(DTYPES), help="keys of this dtype (cast on load); default: the anchors'")
    parser.add_argument("--blocks", help="main-loop config M,N,K,warps,stages[,maxnreg] (default: GPU_CONFIGS)")
    parser.add_argument("--kernel", choices=("sampler", "infonce"), default="sampler",
                        help="the sampler's kernels, or the posterior InfoNCE's (fne_infonce: --dtype, -b, -d apply)")
    parser.add_argument("-d", type=int, default=512, help="feature width of the InfoNCE kernels (caps BLOCK_D)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check compiles the kernels: unset TRITON_INTERPRET")
    from fne_kernels.fne_sampler import Blocks

    blocks = Blocks.parse(args.blocks) if args.blocks else None
    if args.kernel == "infonce":
        rows = check_infonce(args.arch, args.b, args.d, args.dtype)
    else:
        rows = check(args.arch, args.b, args.dtype, args.mode, args.cutdown, args.keys, blocks)
    header = list(rows[0])
    print("  ".join(f"{h:>9}" for h in header))
    for row in rows:
        print("  ".join(f"{str(row[h]):>9}" for h in header))
    spilled = sum(1 for row in rows if row["spills"] or row["local"])
    print(f"{len(rows)} kernels compiled for sm_{args.arch}, {spilled} spill registers to local memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
