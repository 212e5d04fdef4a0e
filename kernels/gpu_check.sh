#!/usr/bin/env bash
# The sampler's GPU check in one run (< 10 minutes): a sweep of the main loop's launch configs (the fastest is used by
# every stage after it: see below), the sampler tests with the gpu-marked ones, then
# `fne-bench sampler` at the scale target (bf16, b=4096, N=2^20, D=512: matmul, triton, torch streaming, dense --
# dense may run out of memory, the table then says OOM), the kernel's candidate tile, the many-fallback regime, bayes
# mode, and N=2^16; then the posterior InfoNCE's fused kernels (kernels/fne_infonce.py: their tests, and
# `fne-bench infonce` forward + backward against its three bare matmuls at the same scale, rows with regime fwd+bwd).  Needs only torch, triton, numpy, scipy, pytest, matplotlib (no deepspeed, open_clip, webdataset,
# omegaconf, submitit): the repository is put on PYTHONPATH and `fne_kernels` is a copy of kernels/.
#
# The sweep times the fused kernel (bf16, official, at the scale target) under each launch config of SWEEP and
# writes the fastest into the copy's GPU_CONFIGS (bf16 / fp16), so the tests and benchmarks below run with it; the
# log's "sweep:" line names it, to be committed to kernels/fne_sampler.py.  GPU_CHECK_SWEEP=0 skips the sweep.
#
# GPU_CHECK_BASELINE=FILE also times FILE, the kernels/fne_sampler.py of another revision, at the scale target in the
# same run (rows "triton (baseline)"): a change to the kernel measured against what it replaces on the same machine.
#
#   bash kernels/gpu_check.sh                                    # on the GPU machine, from the repository root
#   git show REV:kernels/fne_sampler.py > runs/baseline_sampler.py
#   GPU_CHECK_BASELINE=runs/baseline_sampler.py bash kernels/gpu_check.sh
#   GPU_CHECK_TINY=1 OUT=/tmp/gpu_check bash kernels/gpu_check.sh   # dry run on the CPU (interpreter, tiny shapes)
#
# Writes into $OUT (default runs/gpu_check): sampler-<device>-<date>-results.csv, -time.png, -ratio.png and -log.txt
# (every stage's output).  Each stage has its own time limit; a failed stage is reported and the others still run.
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
absolute() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }  # the stages run from a temporary folder
[[ $PY == */* ]] && PY=$(absolute "$PY")
OUT=${OUT:-$ROOT/runs/gpu_check}
TINY=${GPU_CHECK_TINY:-0}
SWEEP_ON=${GPU_CHECK_SWEEP:-1}
BASELINE=${GPU_CHECK_BASELINE:+$(absolute "$GPU_CHECK_BASELINE")}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, register cap]).  128x128 on 8 warps holds one program per SM; on 4 warps
# (255 registers: the epilogue walks the tile in pieces) two share an SM, so that one's epilogue can run beside the
# other's dot without the 64-row tiles' extra L2 traffic; 128x256 and 256x128 load a quarter fewer bytes per
# multiply-add (docs/benchmarks/README.md, "A second bound").  Register caps measured slower on the H100 (2026-11-26).
SWEEP=(128,128,64,8,3 128,128,64,4,3 128,128,64,4,2 128,256,64,8,3 128,256,64,8,2 256,128,64,8,3 64,128,64,4,3)
mkdir -p "$OUT"
WORK=$(mktemp -d)
cp -r "$ROOT/kernels" "$WORK/fne_kernels"  # the import name, without installing the package; the sweep edits it
export PYTHONPATH="$WORK:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK"  # `python -m` puts the working directory first on sys.path: a fne_kernels link in the repository root
            # (the GPU machine's recipe) would shadow the copies
export HF_HUB_OFFLINE=1

DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
SLUG=$(echo "${DEVICE:-unknown}" | tr 'A-Z' 'a-z' | sed -e 's/nvidia//' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
PREFIX="sampler-${SLUG}-$(date -u +%F)-"
LOG="$OUT/${PREFIX}log.txt"
: > "$LOG"

if [ "$TINY" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH=(--device cpu --dtype fp32 --d 32 --repeats 1)
  BIG=(--b 32 --n 2048)
  SMALL=(--b 32 --n 512)
  TESTS=(-k "block_law or parts_merged or hash or fallback_row or splits_do_not")
  LIMIT=600  # the interpreter is slow: generous limits for the dry run
else
  BENCH=(--device cuda --dtype bf16 --d 512 --repeats 10 --warmup 2)
  BIG=(--b 4096 --n 1048576)
  SMALL=(--b 4096 --n 65536)
  TESTS=()
  LIMIT=
fi

FAILED=()
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log everything, never stop the script
  local name=$1 seconds=$2
  shift 2
  [ -n "$LIMIT" ] && seconds=$LIMIT
  echo "=== $name ($(date -u +%T), limit ${seconds}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$seconds" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  [ $rc = 0 ] || FAILED+=("$name (exit $rc)")
}

$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'device', '$DEVICE')" | tee -a "$LOG"
[ "$TINY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1

bench() {  # bench STAGE SECONDS ARGS...: one fne-bench sampler run into its own folder
  local name=$1 seconds=$2
  shift 2
  stage "$name" "$seconds" $PY -m fne_kernels.bench_sampler "${BENCH[@]}" --out "$WORK/$name" "$@"
}

if [ "$SWEEP_ON" = 1 ]; then
  [ "$TINY" = 1 ] && SWEEP=("${SWEEP[@]:0:2}")
  for blocks in "${SWEEP[@]}"; do
    bench "sweep-$blocks" 45 "${BIG[@]}" --impl triton --blocks "$blocks"
  done
  $PY - "$WORK" <<'EOF' 2>&1 | tee -a "$LOG"
"""The fastest swept config becomes GPU_CONFIGS[2] of the copy under $WORK (the repository is not touched)."""
import csv, re, sys
from pathlib import Path
work = Path(sys.argv[1])
timed = []
for path in work.glob("sweep-*/results.csv"):
    for r in csv.DictReader(open(path)):
        if r["time_ms"] not in ("", "None"):
            timed.append((float(r["time_ms"]), path.parent.name.removeprefix("sweep-")))
if not timed:
    sys.exit("sweep: no config ran; GPU_CONFIGS unchanged")
ms, best = min(timed)
print("sweep: " + ", ".join(f"{b} {t:.2f} ms" for t, b in sorted(timed)))
source = work / "fne_kernels" / "fne_sampler.py"
text = source.read_text()
text, count = re.subn(r"GPU_CONFIGS = \{2: Blocks\([^)]*\)", f"GPU_CONFIGS = {{2: Blocks({best})", text)
assert count == 1, "GPU_CONFIGS line not found"
source.write_text(text)
print(f"sweep: fastest {best} ({ms:.2f} ms); the stages below use GPU_CONFIGS[2] = Blocks({best})")
EOF
fi

stage tests 300 $PY -m pytest -q -p no:cacheprovider -m "gpu or not gpu" "${TESTS[@]}" \
  "$ROOT/tests/test_triton_sampler.py" "$ROOT/tests/test_sampler.py" "$ROOT/tests/test_sampler_bench.py" \
  "$ROOT/tests/test_triton_infonce.py"
bench scale 90 "${BIG[@]}" --impl matmul triton torch dense
if [ -n "$BASELINE" ]; then  # the same benchmark through a copy of kernels/ whose sampler is the baseline's
  mkdir -p "$WORK/base"
  cp -r "$ROOT/kernels" "$WORK/base/fne_kernels"
  cp "$BASELINE" "$WORK/base/fne_kernels/fne_sampler.py"
  stage baseline 30 env -C "$WORK/base" PYTHONPATH="$WORK/base:$ROOT" $PY -m fne_kernels.bench_sampler \
    "${BENCH[@]}" --out "$WORK/baseline" "${BIG[@]}" --impl triton
fi
bench tile256 25 "${BIG[@]}" --impl triton --tile-size 256
bench fallback 40 "${BIG[@]}" --impl matmul triton torch --fallback
bench bayes 20 "${BIG[@]}" --impl triton --mode bayes
bench small 25 "${SMALL[@]}" --impl matmul triton torch dense
# The posterior InfoNCE (target: triton <= 1.5x its three matmuls at the scale target), and at N=2^16 with dense.
stage infonce 60 $PY -m fne_kernels.bench_infonce "${BENCH[@]}" --out "$WORK/infonce" "${BIG[@]}" \
  --impl matmul triton torch
stage infonce-small 30 $PY -m fne_kernels.bench_infonce "${BENCH[@]}" --out "$WORK/infonce-small" "${SMALL[@]}" \
  --impl matmul triton torch dense
# Where the main loop's time goes (pipe use, stall reasons, L1/L2 throughput), if Nsight Compute is on the machine:
# one launch of _fne_blocks_kernel at the scale target under the swept config, the sections' text in the log.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
if [ "$TINY" = 1 ]; then
  :
elif [ -n "$NCU" ]; then
  stage profile 120 "$NCU" --kernel-name regex:_fne_blocks_kernel --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section SchedulerStats --section WarpStateStats --section Occupancy \
    $PY -m fne_kernels.bench_sampler "${BENCH[@]}" --out "$WORK/profile-run" "${BIG[@]}" --impl triton --repeats 1 \
    --warmup 2
  rm -rf "$WORK/profile-run"  # its timing ran under the profiler: not a result
else
  echo "profile: no ncu on this machine, skipped" | tee -a "$LOG"
fi

$PY - "$WORK" "$OUT" "$PREFIX" <<'EOF' 2>&1 | tee -a "$LOG"
"""Gather every stage's results.csv into one CSV and two plots, and print the table."""
import csv, sys
from pathlib import Path
from fne_kernels.bench_sampler import plot, print_table, write_csv
work, out, prefix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = []
for path in sorted(work.glob("*/results.csv")):
    with open(path) as f:
        for r in csv.DictReader(f):
            if path.parent.name == "baseline":
                r["impl"] += " (baseline)"
            r.update({k: int(r[k]) for k in ("b", "n", "d")})
            r.update({k: (None if r[k] in ("", "None") else float(r[k])) for k in ("time_ms", "peak_mib", "x_matmul")})
            rows.append(r)
floor = {(r["dtype"], r["b"], r["n"], r["d"]): r["time_ms"] for r in rows
         if r["impl"] == "matmul" and r["regime"] == "typical" and r["time_ms"]}
for r in rows:  # stages without their own matmul row: against the typical-regime matmul of the same shape
    base = floor.get((r["dtype"], r["b"], r["n"], r["d"]))
    if r["x_matmul"] is None and r["time_ms"] and base:
        r["x_matmul"] = r["time_ms"] / base
if rows:
    write_csv(rows, out / f"{prefix}results.csv")
    plot(rows, out, prefix)
    print()
    print_table(rows)
else:
    print("no benchmark results")
EOF

rm -rf "$WORK"
echo
if [ ${#FAILED[@]} = 0 ]; then
  echo "gpu_check: all stages passed; files in $OUT:" | tee -a "$LOG"
else
  echo "gpu_check: FAILED stages: ${FAILED[*]} (see $LOG); files in $OUT:" | tee -a "$LOG"
fi
ls -1 "$OUT" | grep "^$PREFIX" | tee -a "$LOG"
[ ${#FAILED[@]} = 0 ]
