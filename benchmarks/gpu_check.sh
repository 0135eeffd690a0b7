#!/usr/bin/env bash
# One-shot performance check of the GPU targets (README, Performance) on one GPU, in under 8 minutes:
#   Chat decode step at batch 1 and 64, eager and compiled (CPM-Bee 10B, random bf16 weights made on the device);
#   captions/s, greedy and beam 3, at the best batch (250-token prompts, 50 new tokens, compiled);
#   Paint 512x512 DDPM-50 and DPM-Solver++-20 images/s at batch 8 with 8 distinct prompts, PNG included;
#   peak GPU memory. The table goes to stdout and, when $OUT is set, to $OUT/gpu_check.md (with the full logs).
#
#   bash benchmarks/gpu_check.sh                  # GPU: needs a CUDA build of torch (`make install` pins the CPU wheel)
#   VOCAB=/models/viscpm-chat/bee.txt bash benchmarks/gpu_check.sh   # the real 86,583-token vocabulary
#   DRY=1 bash benchmarks/gpu_check.sh            # the same steps on the CPU with tiny models (a few minutes)
#
# Each new batch shape compiles a new CUDA graph (a minute or two at 10B): CHAT_BATCHES (default 64) lists the
# caption batch sizes tried, e.g. CHAT_BATCHES=64,128 when the 8 minutes allow it.
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=${OUT:-$(mktemp -d)}
mkdir -p "$WORK"
TABLE="$WORK/gpu_check.md"
VOCAB_ARGS=()
[ -n "${VOCAB:-}" ] && VOCAB_ARGS=(--vocab "$VOCAB")

if [ "${DRY:-0}" = 1 ]; then
  # tiny models on the CPU; aot_eager traces the graphs that inductor would compile, in seconds
  DEVICE=cpu; DTYPE=float32; CHAT=tiny; PAINT=tiny; STEP_BATCHES=1,4; CHAT_BATCHES=4; PAINT_BATCH=2
  PROMPT_TOKENS=100; NEW_TOKENS=6; PAINT_STEPS=3,2; SIZE=32; BACKEND=aot_eager; REPEATS=1
  TITLE="DRY run on the CPU (tiny models; not the target's numbers)"
else
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA: install a CUDA build of torch, or run with DRY=1")'
  DEVICE=cuda; DTYPE=bfloat16; CHAT=cpm-bee-10b; PAINT=viscpm-paint; STEP_BATCHES=1,64; CHAT_BATCHES=${CHAT_BATCHES:-64}; PAINT_BATCH=8
  PROMPT_TOKENS=250; NEW_TOKENS=50; PAINT_STEPS=50,20; SIZE=512; BACKEND=inductor; REPEATS=1
  TITLE="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)')"
fi

{
  echo "## gpu_check $(date -u +%Y-%m-%d) - $TITLE"
  echo
  echo "| measure | measured | target |"
  echo "|---|---|---|"
} > "$TABLE"

start=$(date +%s)
echo "== chat: decode step, then captions (logs: $WORK/chat.log)"
"$PYTHON" benchmarks/chat_generate.py --config "$CHAT" "${VOCAB_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" \
  --step-batches "$STEP_BATCHES" --compile --compile-backend "$BACKEND" --batch-sizes "$CHAT_BATCHES" \
  --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --no-step \
  --summary "$TABLE" 2>&1 | tee "$WORK/chat.log"
echo "== paint (logs: $WORK/paint.log)"
"$PYTHON" benchmarks/paint_generate.py --preset "$PAINT" "${VOCAB_ARGS[@]}" --device "$DEVICE" --dtype "$DTYPE" \
  --batch-sizes "$PAINT_BATCH" --size "$SIZE" --steps "$PAINT_STEPS" --repeats "$REPEATS" \
  --summary "$TABLE" 2>&1 | tee "$WORK/paint.log"
echo "| wall time of this check | $(( $(date +%s) - start )) s | < 480 s |" >> "$TABLE"

echo
cat "$TABLE"
