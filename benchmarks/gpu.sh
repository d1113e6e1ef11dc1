#!/usr/bin/env bash
# GPU checks (make bench-gpu), < 10 minutes on one CUDA card:
#   1. the scale benchmark (benchmarks/scale.py, Qwen3-0.6B shapes, 2 layers, quick setting) on CUDA with
#      the family's Newton–Schulz in bf16 and in fp32 (peers: bf16 as shipped and fp32 rows in both runs);
#   2. the GPU-marked tests (pytest -m gpu: the fp16 GradScaler end-to-end training, ...).
# The card's name is recorded in each result file (environment.gpu) and at the top of the test log;
# `python -m benchmarks.report --only report` style regeneration puts the numbers into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-benchmarks/results}
SETTING=${SETTING:-quick}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device')"
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "card: $CARD"
mkdir -p "$OUT"
start=$SECONDS
for NS in bfloat16 float32; do
  "$PY" -m benchmarks.scale --device cuda --ns_dtype "$NS" --setting "$SETTING" --json "$OUT/scale_cuda_$NS.json"
done
# 3. the FSDP2 (DTensor) path on CUDA with NCCL: world size 1 exercises sharded state, owner-computes
#    Newton–Schulz (all-to-all) and the cross-shard reductions (benchmarks/fsdp2.py)
"$PY" -m torch.distributed.run --nproc_per_node 1 -m benchmarks.fsdp2 --device cuda --out "$OUT/fsdp2_cuda.json"
{ echo "card: $CARD"; date -u; } > "$OUT/gpu_tests.log"
status=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider -rs 2>&1 | tee -a "$OUT/gpu_tests.log" || status=$?
echo "gpu.sh: done in $((SECONDS - start)) s on $CARD (tests exit $status); results in $OUT/scale_cuda_*.json, $OUT/gpu_tests.log"
exit $status
