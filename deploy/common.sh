#!/usr/bin/env bash
# Shared by the deploy recipes, which source it: the extraction's defaults, the `extract` options
# every recipe passes, and DRY_RUN. One place, so the recipes cannot drift apart.
set -euo pipefail

MODEL="${MODEL:-Qwen/Qwen2.5-7B}"
INPUT="${INPUT:-hf://HuggingFaceFW/fineweb-edu/sample-10BT:train}"
read -r -a LAYERS_ARR <<< "${LAYERS:-7 14 21}"
# shellcheck disable=SC2034  # read by the recipes that source this file
read -r -a EXTRA_BEAM_ARR <<< "${EXTRA_BEAM_ARGS:-}"

# extract_args OUTPUT: sets EXTRACT_ARGS to the extract options of a run writing to OUTPUT.
# Optional: SEQ_LEN, BATCH_SIZE, NUM_SHARDS, MAX_DOCS, MESH, HOOKS (space-separated), COMPILATION_CACHE.
extract_args() {
  EXTRACT_ARGS=(
    --model "$MODEL"
    --input "$INPUT"
    --layers "${LAYERS_ARR[@]}"
    --output "$1"
    --seq-len "${SEQ_LEN:-1024}"
    --batch-size "${BATCH_SIZE:-8}"
    --num-shards "${NUM_SHARDS:-0}"
  )
  if [[ -n "${MAX_DOCS:-}" ]]; then EXTRACT_ARGS+=(--max-docs "$MAX_DOCS"); fi
  if [[ -n "${MESH:-}" ]]; then EXTRACT_ARGS+=(--mesh "$MESH"); fi
  if [[ -n "${HOOKS:-}" ]]; then read -r -a hooks <<< "$HOOKS"; EXTRACT_ARGS+=(--hooks "${hooks[@]}"); fi
  if [[ -n "${COMPILATION_CACHE:-}" ]]; then EXTRACT_ARGS+=(--compilation-cache "$COMPILATION_CACHE"); fi
}

run() {  # DRY_RUN=1: print the command, shell-quoted, instead of running it
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}
