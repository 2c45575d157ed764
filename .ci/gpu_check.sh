#!/usr/bin/env bash
# The one GPU script: run it first whenever a GPU is at hand, before GPU time goes to anything else.
# From the checkout, with nothing installed:
#
#   OUT=/path/to/results bash .ci/gpu_check.sh /path/to/data-root     # root holds MNIST/raw/*.gz
#
# Steps, most important first (each guarded and time-limited, so one failure or hang does not cost
# the rest, and a budget cut loses the least):
#   1. nvidia-smi and the software versions                               -> $OUT/env.txt
#   2. mnist-dist bench, reference preset, fp32: the loop; the bare step eager, channels_last,
#      compiled, compiled + channels_last; the conventional pipeline      -> $OUT/bench-fp32.json
#   3. bench with the graph-captured step ($GRAPH_OPTION)                 -> $OUT/bench-graph.json
#   4. the full reference recipe, fp32 then bf16 (graph-captured where $GRAPH_OPTION exists)
#                                                                         -> $OUT/train-reference-*.json
#   5. the default preset likewise                                        -> $OUT/train-default-*.json
#   6. the fast preset on seeds 1-5, one at a time                        -> $OUT/train-fast-seed*.json
#   7. bench in bf16: the loop, the bare step eager and compiled          -> $OUT/bench-bf16.json
# A step whose option or preset this checkout lacks is logged as SKIPPED. Everything printed goes to
# $OUT/gpu_check.log too; each training's summary.json is kept (time and final accuracy).
#
# GPU_CHECK_BUDGET (seconds, default 480) bounds the whole script: a step gets at most what is left.
# The caps fit what an H200 took on 2026-12-04: bench fp32 110 s (torch.compile's warm-up 47 s), the
# graph-captured loop's warm-up 20 s, the reference recipe with --cuda-graph about 1.4 s an epoch.
# GPU_CHECK_TINY=1 runs every command line once on a tiny slice, eager, on two threads, with 10x the
# time caps and two fast-preset seeds, so the script itself is checked on a CPU (CI does, through
# tests/test_bench.py).
set -u
DATA="${1:?usage: bash .ci/gpu_check.sh DATA_ROOT (the folder holding MNIST/raw/*.gz)}"
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
GRAPH_OPTION=--cuda-graph  # the train/bench option of the graph-captured step
DATA="$(cd "$DATA" && pwd)" || exit 2
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
LOG="$OUT/gpu_check.log"
START=$SECONDS
: >"$LOG"

SCALE=1  # multiplies every step's time cap
ALSO_COVERED=""  # trainings skipped in tiny mode: another one runs their command line
SEEDS=(1 2 3 4 5)
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  # The script's own check: every command line once, on a few steps; eager, since a compilation costs
  # a CPU tens of seconds (the compiled paths have tests of their own).
  BENCH=(--max-train-samples 512 --epochs 1 --steps 4 --warmup-steps 2 --rounds 1 --workers 0 --threads 2)
  BARE_ALL=(--bare "eager,channels_last")
  BARE_BF16=(--bare eager)
  TRAIN=(--epochs 1 --max-train-samples 512 --no-compile --threads 2)
  ALSO_COVERED="reference-bf16 default-fp32"  # the same command lines as default-bf16, reference-fp32
  SEEDS=(1 2)
  SCALE=10  # a CPU is slow, bf16 even more so
else
  # The whole split (390 steps an epoch), one warm-up and one timed epoch; bare and conventional time
  # 200 steps. The conventional pipeline is CPU-bound: timed in fp32 only.
  BENCH=(--max-train-samples 50000 --epochs 1 --steps 200 --rounds 1 --workers "0,2,4,8")
  BARE_ALL=()
  BARE_BF16=(--bare "eager,compile")
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

skipped() {  # skipped NAME REASON
  echo "=== $1: SKIPPED ($2)" | tee -a "$LOG"
}

has_option() {  # has_option COMMAND --flag: whether this checkout's `mnist-dist COMMAND` takes it
  COLUMNS=400 "$PY" -m mnist_dist.cli "$1" --help 2>/dev/null | grep -q -- "$2\b"
}

has_preset() {
  "$PY" -c "import sys; from mnist_dist.config import PRESETS; sys.exit('$1' not in PRESETS)" 2>/dev/null
}

bench() {  # bench NAME CAP [bench options...]
  local name=$1 cap=$2
  shift 2
  step "bench $name" "$cap" "$PY" -m mnist_dist.cli bench --preset reference --data-dir "$DATA" \
    "${BENCH[@]}" --json "$OUT/bench-$name.json" "$@"
}

train() {  # train NAME CAP [train options...]: one full training, its summary kept
  local name=$1 cap=$2
  shift 2
  step "train $name" "$cap" "$PY" -m mnist_dist.cli train --data-dir "$DATA" --wandb disabled \
    --output-dir "$WORK" --name "$name" "${TRAIN[@]}" "$@"
  cp "$WORK/$name/summary.json" "$OUT/train-$name.json" 2>/dev/null \
    || echo "=== $name: no summary.json" | tee -a "$LOG"
}

{
  timeout 20 nvidia-smi || echo "nvidia-smi: exit $?"
  timeout 60 "$PY" -c 'import platform, torch, torchvision, accelerate
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"torchvision {torchvision.__version__}, accelerate {accelerate.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")' || echo "versions: exit $?"
  git log -1 --format='checkout %h %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
tee -a "$LOG" <"$OUT/env.txt"

GRAPH=()  # the graph-captured step where this checkout has it; else the trainings run eager
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  skipped "graph capture" "tiny CPU mode: CUDA graphs need a GPU; the trainings run without them"
elif has_option train "$GRAPH_OPTION"; then
  GRAPH=("$GRAPH_OPTION")
else
  skipped "graph capture" "option $GRAPH_OPTION not available: the trainings run without it"
fi

bench fp32 150 --precision no "${BARE_ALL[@]}"
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  skipped "bench graph" "tiny CPU mode: CUDA graphs need a GPU"
elif has_option bench "$GRAPH_OPTION"; then
  bench graph 90 --precision no --bare "eager,compile" --no-conventional "$GRAPH_OPTION"
else
  skipped "bench graph" "option $GRAPH_OPTION not available"
fi
for preset_cap in reference:60 default:90; do
  for precision in fp32 bf16; do
    if [[ " $ALSO_COVERED " == *" ${preset_cap%:*}-$precision "* ]]; then
      skipped "train ${preset_cap%:*}-$precision" "tiny CPU mode: another training runs its command line"
      continue
    fi
    train "${preset_cap%:*}-$precision" "${preset_cap#*:}" --preset "${preset_cap%:*}" \
      --precision "${precision/fp32/no}" "${GRAPH[@]}"
  done
done
if has_preset fast; then
  for seed in "${SEEDS[@]}"; do
    train "fast-seed$seed" 15 --preset fast --seed "$seed" "${GRAPH[@]}"
  done
else
  skipped "train fast" "preset fast not available"
fi
bench bf16 60 --precision bf16 --no-conventional "${BARE_BF16[@]}"

echo "=== done in $((SECONDS - START))s; files in $OUT:" | tee -a "$LOG"
find "$OUT" -maxdepth 2 -type f -printf '%10s  %p\n' | sort -k2 | tee -a "$LOG"
rm -rf "$WORK"
