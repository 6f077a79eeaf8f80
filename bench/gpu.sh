#!/usr/bin/env bash
# The benchmark on one CUDA GPU, unattended, in under 5 minutes: GPT-2 124M, batch 16 x 1024 tokens,
# bf16 autocast, SDPA (flash attention), eager and then torch.compile'd (every contender alike),
# MFU against the dense bf16 peak of the H100/H200 SXM datasheet, 989 TFLOP/s (the matrix-product
# peak measured in the same run is recorded beside it), plus KV-cache generation.
#
#   bash bench/gpu.sh                 # writes bench/results/gpu.json and gpu.log (or under $OUT)
#
# It needs python3 with torch (CUDA) and transformers, and runs the repository's llm_scratch from
# the working tree. The anchor baseline (llms-from-scratch) is installed from bench/wheels/ when it
# is missing (such machines often have no network: put the wheel there first with
#   pip download --no-deps llms-from-scratch==1.0.19 -d bench/wheels );
# without it the anchor's columns stay empty. Never part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import llms_from_scratch" 2>/dev/null; then
  whl=$(ls bench/wheels/llms_from_scratch-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$whl" ]; then "$PY" -m pip install -q --no-deps --no-index "$whl" || echo "note: could not install $whl"
  else echo "note: llms-from-scratch is not installed and bench/wheels/ has no wheel: no anchor baseline"; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
# 290 s: the run writes its JSON after every section, so a cut-short run still leaves what it finished
timeout 290 "$PY" bench/run.py --device cuda --precision bf16 --compile --sections train,levers,generate \
  --out "$DEST/gpu.json" 2>&1 | tee "$DEST/gpu.log"
