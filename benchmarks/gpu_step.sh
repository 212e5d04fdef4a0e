#!/usr/bin/env bash
# Issue 10's GPU figures: `fne-bench step` (the trainer's own step against a CLIP step, one rank) for open_clip
# ViT-B-32, batch 256, bf16, at global buffers 65,536 / 262,144 / 1,048,576, with momentum keys and with online keys
# (issue 26), and the configs' objective soft_clip (momentum keys, no buffer: one row).  Appends to $OUT/step.csv.
# Targets: FNE / CLIP <= 1.35x at 262,144 (momentum keys), <= 1.10x (online keys); FNE step time within 5% from
# 65,536 to 1,048,576; soft_clip <= 1.15x (issue 24).  About 4.5 minutes (FNE_KEYS=momentum or =online: one kind
# only, about 2.5).  Then the gpu-marked tests that need this installed stack (kernels/gpu_check.sh runs the kernels'
# own, without it): the FNE step waits for nothing on the GPU, ZeRO-3's momentum forward, the NCCL benchmarks
# (output in $OUT/gpu-tests.txt; a failure is reported and the figures above stand).
#
# The GPU image lacks deepspeed, open_clip, omegaconf, webdataset, submitit (ENVIRONMENT.md, "The GPU machine"):
# they come from the wheels in the ignored folder .whl/ of the checkout (make them with the pip download / pip
# wheel commands given there), installed into /tmp/site without the network.
# FNE_TINY=1: a dry run on the CPU at tiny sizes (the demo's tiny ViT, batch 8, buffers 256 / 512 / 1024).
# FNE_IMPL: the sampler (default auto: the Triton kernel on a GPU, which needs col_offset support, issue 12; torch
# is the streaming fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
if ! "$PYTHON" -c "import deepspeed, open_clip, omegaconf, webdataset" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import fne_kernels" 2>/dev/null || ln -sfn kernels fne_kernels  # the import name, without a pip install

if [[ "${FNE_TINY:-0}" == 1 ]]; then
    model=configs/models/tiny-vit.json; batch=8; buffers="256 512 1024"; timing=(--steps 2 --warmup 1); dtype=()
else
    model=ViT-B-32; batch=256; buffers="65536 262144 1048576"; timing=(--steps 20 --warmup 5); dtype=(--dtype bf16)
fi
for keys in ${FNE_KEYS:-momentum online}; do
    for buffer in $buffers; do
        "$PYTHON" -m fne_dist.bench step --model "$model" --batch "$batch" --queue "$buffer" --mode bayes \
            --impl "${FNE_IMPL:-auto}" --keys "$keys" \
            "${dtype[@]}" "${timing[@]}" --csv "$OUT/step.csv"
    done
done
set -- $buffers
"$PYTHON" -m fne_dist.bench step --model "$model" --batch "$batch" --queue "$2" --objective soft_clip \
    "${dtype[@]}" "${timing[@]}" --csv "$OUT/step.csv"
cat "$OUT/step.csv"
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_objectives.py tests/test_momentum.py \
    tests/test_ema_bench.py tests/test_buffer_bench.py > "$OUT/gpu-tests.txt" 2>&1 \
    || echo "gpu-marked tests: exit $? (see $OUT/gpu-tests.txt)"
tail -n 3 "$OUT/gpu-tests.txt"
