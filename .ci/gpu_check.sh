#!/usr/bin/env bash
# One GPU session's worth of measurements for issue 7, run from the checkout with nothing installed:
#
#   OUT=/path/to/results bash .ci/gpu_check.sh /path/to/data-root     # root holds MNIST/raw/*.gz
#
# Steps (each guarded and time-limited, so one failure or hang does not cost the rest):
#   1. nvidia-smi and the software versions                          -> $OUT/env.txt
#   2. mnist-dist bench: fp32, bf16, bf16+channels_last, bf16+compile -> $OUT/bench-*.json (+ tables in the log)
#   3. the full reference recipe on one GPU, fp32, then bf16+compile -> $OUT/train-reference*.json
# Everything printed goes to $OUT/gpu_check.log too. At most 8 files land in $OUT.
#
# GPU_CHECK_BUDGET (seconds, default 360) bounds the whole script: a step gets at most what is left.
# GPU_CHECK_TINY=1 runs every step on a tiny slice with 10x the time caps, so the script itself can be
# checked on a CPU (give it GPU_CHECK_BUDGET=3000 there).
set -u
DATA="${1:?usage: bash .ci/gpu_check.sh DATA_ROOT (the folder holding MNIST/raw/*.gz)}"
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${GPU_CHECK_BUDGET:-360}"
DATA="$(cd "$DATA" && pwd)" || exit 2
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
LOG="$OUT/gpu_check.log"
START=$SECONDS
: >"$LOG"

SCALE=1  # multiplies every step's time cap
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  BENCH=(--max-train-samples 512 --epochs 1 --steps 4 --warmup-steps 2 --rounds 1 --workers 1)
  TRAIN=(--epochs 1 --max-train-samples 512)
  SCALE=10  # a CPU is slow, bf16 and compilation even more so
else
  # The whole split (390 steps an epoch), one warm-up and two timed epochs; bare and conventional
  # time one epoch's steps. The conventional pipeline is CPU-bound: timed in fp32 and bf16 only.
  BENCH=(--max-train-samples 50000 --epochs 2 --steps 390 --rounds 1)
  TRAIN=()
fi

# step NAME CAP_SECONDS CMD...: run CMD under the smaller of CAP and the budget left; log its result.
step() {
  local name=$1 cap=$2 left limit rc t0=$SECONDS
  shift 2
  cap=$((cap * SCALE))
  left=$((BUDGET - (SECONDS - START)))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: SKIPPED (${left}s of the ${BUDGET}s budget left)" | tee -a "$LOG"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  # SIGINT, not TERM: training treats SIGTERM as preemption (checkpoint, then stop).
  timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')" | tee -a "$LOG"
  return 0
}

bench() {  # bench NAME CAP [bench options...]
  local name=$1 cap=$2
  shift 2
  step "bench $name" "$cap" "$PY" -m mnist_dist.cli bench --preset reference --data-dir "$DATA" \
    "${BENCH[@]}" --json "$OUT/bench-$name.json" "$@"
}

train_reference() {  # train_reference NAME CAP [train options...]: the full recipe, summary kept
  local name=$1 cap=$2
  shift 2
  step "train $name" "$cap" "$PY" -m mnist_dist.cli train --preset reference --data-dir "$DATA" \
    --wandb disabled --output-dir "$WORK" --name "$name" "${TRAIN[@]}" "$@"
  cp "$WORK/$name/summary.json" "$OUT/$name.json" 2>/dev/null || echo "=== $name: no summary.json" | tee -a "$LOG"
}

{
  timeout 20 nvidia-smi || echo "nvidia-smi: exit $?"
  timeout 60 "$PY" -c 'import platform, torch, torchvision, accelerate
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"torchvision {torchvision.__version__}, accelerate {accelerate.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")' || echo "versions: exit $?"
} >"$OUT/env.txt" 2>&1
tee -a "$LOG" <"$OUT/env.txt"

bench fp32 75 --precision no
bench bf16 60 --precision bf16
bench bf16-channels-last 45 --precision bf16 --channels-last --no-conventional
bench bf16-compile 120 --precision bf16 --compile --no-conventional
train_reference train-reference 75
train_reference train-reference-bf16-compile 100 --precision bf16 --compile

echo "=== done in $((SECONDS - START))s; files in $OUT:" | tee -a "$LOG"
find "$OUT" -maxdepth 2 -type f -printf '%10s  %p\n' | sort -k2 | tee -a "$LOG"
rm -rf "$WORK"
