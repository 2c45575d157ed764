#!/usr/bin/env bash
# Train on this machine: one process per visible GPU, or one CPU process when there is no GPU.
#
#   launch/train.sh [mnist-dist train options]     all visible GPUs (or the CPU)
#   GPUS=1 launch/train.sh --preset reference            one GPU
#   CUDA_VISIBLE_DEVICES=2,3 launch/train.sh        these two GPUs
#   CUDA_VISIBLE_DEVICES= launch/train.sh           the CPU, even where there are GPUs
#   PROCESSES=2 launch/train.sh                     force the process count (e.g. 2 CPU ranks)
#   DRY_RUN=1 launch/train.sh ...                   print the command instead of running it
#
# SIGTERM, SIGUSR1 or Ctrl-C (SIGINT) during training: every rank stops at the next step, writes a
# checkpoint and the command exits 75 (130 after Ctrl-C); the same command with --name <run>
# --resume auto continues (docs/cluster.md).
set -euo pipefail

count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then # what torch will see
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
            echo 0
        else
            local -a ids
            IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
            echo "${#ids[@]}"
        fi
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

gpus="${GPUS:-$(count_gpus)}"
processes="${PROCESSES:-$((gpus > 0 ? gpus : 1))}"
cmd=(mnist-dist train --processes "$processes" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
# exec: signals sent to this script reach mnist-dist, which forwards them to the ranks.
exec "${cmd[@]}"
