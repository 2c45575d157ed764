#!/usr/bin/env bash
# The check a behaviour-preserving change must pass: the same short fixed run at two commits writes a
# byte-identical model.safetensors on the CPU, for the reference and the default preset.
#
#   .ci/same_weights.sh BEFORE_REV [AFTER_REV]      (AFTER_REV: the working tree)
#
# TRAIN_ARGS adds options to both runs, e.g. TRAIN_ARGS="--no-compile --no-channels-last" holds a tree
# whose CPU speed defaults changed to the eager path the older one ran.
#
# Needs MNIST ($MNIST_DATA_DIR) and the project's environment active.
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1 after=${2:-}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/before" >/dev/null 2>&1 || true; \
      [[ -n "$after" ]] && git worktree remove --force "$work/after" >/dev/null 2>&1; rm -rf "$work"' EXIT
git worktree add -q --detach "$work/before" "$before"
tree=$PWD
if [[ -n "$after" ]]; then
    git worktree add -q --detach "$work/after" "$after"
    tree=$work/after
fi
run() {  # run REPO PRESET OUT: print the sha256 of the run's weights
    (cd "$1" && PYTHONPATH="$1" WANDB_MODE=disabled python -m mnist_dist.train --preset "$2" \
        --max-train-samples 4096 --epochs 2 --threads 2 --seed 1 --output-dir "$3" --name "$2" \
        ${TRAIN_ARGS:-} >"$3-$2.log" 2>&1) || { echo "the $2 run in $1 failed: $3-$2.log" >&2; exit 1; }
    sha256sum <"$3/$2/model.safetensors" | cut -d' ' -f1
}
status=0
for preset in reference default; do
    a=$(run "$work/before" "$preset" "$work/runs-before")
    b=$(run "$tree" "$preset" "$work/runs-after")
    if [[ "$a" == "$b" ]]; then echo "$preset: identical ($a)"; else echo "$preset: DIFFERENT ($a vs $b)"; status=1; fi
done
exit "$status"
