#!/usr/bin/env bash
# GPU checks (make bench-gpu), < 10 minutes on one CUDA card, in order of importance:
#   1. the GPU-marked tests (pytest -m gpu: no host synchronisation under torch.cuda.set_sync_debug_mode
#      ("error") for every member, CUDA vs CPU steps, bf16 Newton–Schulz, compile=True, the fp16 GradScaler
#      and bf16 Trainer runs);
#   2. the scale benchmark (benchmarks/scale.py, Qwen3-0.6B shapes, 2 layers, setting "gpu") on CUDA with
#      the family's Newton–Schulz in bf16 and in fp32 (peers: bf16 as shipped and fp32 rows in both runs);
#   3. the FSDP2 (DTensor) path on CUDA with NCCL at world size 1 (benchmarks/fsdp2.py);
#   4. a kernel-time profile of SAM's bookkeeping and the AdamW track (benchmarks/kernel_profile.py);
#   5. SAM's bookkeeping at 2 and 28 layers: the in-place chain, compile=True (fused passes for large
#      tensors, Triton) and the fused passes forced onto all (scale.py's sam_bookkeeping part, sam_cuda.json).
# Each stage has its own time limit and writes as it goes, so a stage that runs out keeps what it measured
# and the next one still runs. The card's name is recorded in each result file (environment.gpu) and at the
# top of the test log; `python -m benchmarks.run --setting full --only report` puts the numbers into
# BENCHMARKS.md once the result files are in benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-benchmarks/results}
SETTING=${SETTING:-gpu}
LIMIT_TESTS=${LIMIT_TESTS:-180}
LIMIT_SCALE=${LIMIT_SCALE:-150}
LIMIT_FSDP2=${LIMIT_FSDP2:-60}
LIMIT_PROFILE=${LIMIT_PROFILE:-90}
LIMIT_SAM=${LIMIT_SAM:-120}
STAGES=${STAGES:-tests scale fsdp2 profile sam}  # a subset reruns only those stages
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device')" || exit 1
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
mkdir -p "$OUT"
{ echo "card: $CARD"; date -u; "$PY" -c "import torch, transformers, accelerate
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| accelerate', accelerate.__version__)"; } | tee "$OUT/gpu_tests.log"
start=$SECONDS
status=0
if [[ " $STAGES " == *" tests "* ]]; then
  # a module whose optional imports (datasets, trl) are missing on the card's image holds no GPU test
  timeout "$LIMIT_TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs --durations=8 \
    --continue-on-collection-errors 2>&1 | tee -a "$OUT/gpu_tests.log" || status=$?
  echo "gpu.sh: tests exit $status after $((SECONDS - start)) s"
fi
if [[ " $STAGES " == *" scale "* ]]; then
  for NS in bfloat16 float32; do
    timeout "$LIMIT_SCALE" "$PY" -m benchmarks.scale --device cuda --ns_dtype "$NS" --setting "$SETTING" \
      --parts optimizer_step,training_step,adamw_track,ns_shapes --json "$OUT/scale_cuda_$NS.json" 2>&1 \
      | tee -a "$OUT/scale_cuda.log" || echo "gpu.sh: scale $NS exit $? after $((SECONDS - start)) s"
  done
fi
if [[ " $STAGES " == *" fsdp2 "* ]]; then
  timeout "$LIMIT_FSDP2" "$PY" -m torch.distributed.run --nproc_per_node 1 -m benchmarks.fsdp2 --device cuda \
    --out "$OUT/fsdp2_cuda.json" 2>&1 | tee "$OUT/fsdp2_cuda.log" || echo "gpu.sh: fsdp2 exit $?"
fi
if [[ " $STAGES " == *" profile "* ]]; then
  timeout "$LIMIT_PROFILE" "$PY" -m benchmarks.kernel_profile cuda > "$OUT/kernel_profile_cuda.txt" 2>&1 \
    || echo "gpu.sh: kernel profile exit $?"
fi
if [[ " $STAGES " == *" sam "* ]]; then
  timeout "$LIMIT_SAM" "$PY" -m benchmarks.scale --device cuda --ns_dtype bfloat16 --setting "$SETTING" \
    --parts sam_bookkeeping --json "$OUT/sam_cuda.json" 2>&1 | tee -a "$OUT/scale_cuda.log" \
    || echo "gpu.sh: sam bookkeeping exit $?"
fi
echo "gpu.sh: done in $((SECONDS - start)) s on $CARD (tests exit $status); results in $OUT"
exit $status
