#!/usr/bin/env bash
# Independent-host mode on a fleet of TPU VMs: every host extracts its own disjoint share of the
# input (`extract --num-hosts N --host-index I`) into OUTPUT/host-IIIII, then one `merge` makes
# OUTPUT a single dataset whose files are the hosts' files, referenced in place.
#
#   deploy/tpu_vm/run_all_hosts.sh STEP...      steps run in the order given
#
#   preflight  on every host: refuse if a process holds the TPU (sudo lsof -w /dev/accel* /dev/vfio/*),
#              else remove a stale /tmp/libtpu_lockfile left by a crashed run
#   install    build this package's wheel here, copy it to every host, install it with jax[tpu]
#              into the venv REMOTE_VENV (one time per fleet)
#   start      start the extraction on every host, detached (nohup; survives a dropped ssh), with
#              its log in ~/llm_activations-host-IIIII.log and exit status in ~/...-host-IIIII.rc
#   wait       poll every host until all finished; fail on the first non-zero exit status
#   merge      python -m llm_activations merge --output OUTPUT OUTPUT/host-00000 ... (on host 0)
#   all        preflight start wait merge
#
# The fleet, one of:
#   TPU_NAMES="v4-a v4-b ..."   single-host TPU VMs (e.g. 32 x v4-8): host I = the I-th name, worker 0.
#                               Fully independent: a failed host can be rerun alone.
#   TPU_NAME=my-v4-64           one multi-host slice: host I = worker I (NUM_HOSTS defaults to the
#                               slice's worker count). The hosts of a slice share one TPU runtime:
#                               start them together, and rerun all of them if one fails.
# Required: ZONE, OUTPUT (gs://... every host can write), and TPU_NAMES or TPU_NAME.
# Optional: PROJECT, NUM_HOSTS (slice mode), MODEL, INPUT, LAYERS (space-separated), SEQ_LEN,
#           BATCH_SIZE, NUM_SHARDS, MAX_DOCS, MESH (DATA,MODEL), OVERWRITE=1, POLL_SECONDS,
#           REMOTE_VENV (relative to the remote home; default llm-activations-venv),
#           REMOTE_PYTHON (python3.11 or newer on the hosts; default python3), PYTHON (here, for `install`),
#           ONLY="3 17": run preflight/start/wait on these host indices only (to rerun failed hosts,
#           with OVERWRITE=1), then `merge` as usual.
# DRY_RUN=1 prints every gcloud command instead of running it (`wait` then assumes success).
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
: "${ZONE:?set ZONE to the zone of the TPU VMs, e.g. us-central2-b}"
: "${OUTPUT:?set OUTPUT to a gs:// folder every host can write, e.g. gs://my-bucket/activations/run1}"
if [[ -z "${TPU_NAMES:-}" && -z "${TPU_NAME:-}" ]]; then
  echo "set TPU_NAMES (single-host TPU VMs, space-separated) or TPU_NAME (one multi-host slice)" >&2
  exit 2
fi
OUTPUT="${OUTPUT%/}"
# Versions must match requirements.txt (tests/test_deploy.py checks them).
JAX_VERSION=0.10.2
BEAM_VERSION=2.77.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
REMOTE_VENV="${REMOTE_VENV:-llm-activations-venv}"
POLL_SECONDS="${POLL_SECONDS:-300}"
GCLOUD_ARGS=(--zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then GCLOUD_ARGS+=(--project "$PROJECT"); fi

# ----------------------------------------------------------------------------- the hosts

# HOST_TPU[i], HOST_WORKER[i]: where host i runs.
HOST_TPU=()
HOST_WORKER=()
if [[ -n "${TPU_NAMES:-}" ]]; then
  read -r -a names <<< "$TPU_NAMES"
  for name in "${names[@]}"; do HOST_TPU+=("$name"); HOST_WORKER+=(0); done
else
  if [[ -z "${NUM_HOSTS:-}" && -n "${DRY_RUN:-}" ]]; then
    echo "set NUM_HOSTS for a dry run of a slice (it is otherwise read from gcloud)" >&2
    exit 2
  elif [[ -z "${NUM_HOSTS:-}" ]]; then
    NUM_HOSTS="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_ARGS[@]}" --format=json \
      | "$PYTHON" -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))')"
  fi
  for ((w = 0; w < NUM_HOSTS; w++)); do HOST_TPU+=("$TPU_NAME"); HOST_WORKER+=("$w"); done
fi
N="${#HOST_TPU[@]}"

host_dir() { printf '%s/host-%05d' "$OUTPUT" "$1"; }
host_file() { printf 'llm_activations-host-%05d.%s' "$1" "$2"; }  # in the remote home

on_host() {  # on_host I COMMAND: run COMMAND on host I
  run gcloud compute tpus tpu-vm ssh "${HOST_TPU[$1]}" "${GCLOUD_ARGS[@]}" --worker="${HOST_WORKER[$1]}" --command "$2"
}

selected() {  # selected I: is host I among ONLY (all hosts when ONLY is unset)?
  [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]
}

in_parallel() {  # in_parallel FUNCTION: FUNCTION I for every selected host I, side by side (in order for DRY_RUN)
  local i pids=()
  for ((i = 0; i < N; i++)); do
    if ! selected "$i"; then continue; fi
    if [[ -n "${DRY_RUN:-}" ]]; then "$1" "$i"; else "$1" "$i" & pids+=($!); fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

on_all() {  # on_all COMMAND: run COMMAND on every (selected) host (--worker=all on a whole slice)
  if [[ -n "${TPU_NAME:-}" && -z "${TPU_NAMES:-}" && -z "${ONLY:-}" ]]; then
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_ARGS[@]}" --worker=all --command "$1"
  else
    ON_ALL_COMMAND="$1"
    in_parallel on_all_host
  fi
}
on_all_host() { on_host "$1" "$ON_ALL_COMMAND"; }

# ----------------------------------------------------------------------------- steps

preflight() {
  # A crashed or killed JAX process can leave /tmp/libtpu_lockfile behind; the next process then
  # fails with "TPU in use". Remove it only when no process holds the TPU device files
  # (/dev/accel* on v4/v5p, /dev/vfio/* on v5e/v6e). Single quotes: this expands on the host.
  # shellcheck disable=SC2016
  on_all 'holders="$(sudo lsof -w /dev/accel* /dev/vfio/* 2>/dev/null || true)"
if [ -n "$holders" ]; then echo "$(hostname): the TPU is in use:"; echo "$holders"; exit 1; fi
if [ -e /tmp/libtpu_lockfile ]; then sudo rm -f /tmp/libtpu_lockfile; echo "$(hostname): removed a stale /tmp/libtpu_lockfile"; fi
echo "$(hostname): TPU free"'
}

install() {
  local dist wheel
  dist="$(mktemp -d)"
  run "$PYTHON" -m pip wheel --no-deps --wheel-dir "$dist" "$ROOT"
  wheel="$dist/llm_activations-0.1.0-py3-none-any.whl"
  if [[ -z "${DRY_RUN:-}" ]]; then wheel="$(ls "$dist"/llm_activations-*.whl)"; fi
  local i
  for ((i = 0; i < N; i++)); do
    if [[ -n "${TPU_NAME:-}" && -z "${TPU_NAMES:-}" && $i -gt 0 ]]; then break; fi  # --worker=all below
    local worker="${HOST_WORKER[$i]}"
    if [[ -n "${TPU_NAME:-}" && -z "${TPU_NAMES:-}" ]]; then worker=all; fi
    run gcloud compute tpus tpu-vm scp "$wheel" "${HOST_TPU[$i]}:/tmp/" "${GCLOUD_ARGS[@]}" --worker="$worker"
  done
  on_all "set -e
$(printf '%q' "$REMOTE_PYTHON") -m venv $(printf '%q' "$REMOTE_VENV")
$(printf '%q' "$REMOTE_VENV")/bin/pip install --upgrade pip
$(printf '%q' "$REMOTE_VENV")/bin/pip install 'jax[tpu]==$JAX_VERSION' 'apache-beam[gcp]==$BEAM_VERSION' /tmp/$(basename "$wheel")
$(printf '%q' "$REMOTE_VENV")/bin/python -c 'import jax; print(jax.local_device_count(), \"TPU chips/cores on\", jax.devices()[0].device_kind)'"
}

extract_command() {  # the extraction of host I, as one shell-quoted line
  local i="$1"
  extract_args "$(host_dir "$i")"
  local args=(
    "$REMOTE_VENV/bin/python" -m llm_activations extract "${EXTRACT_ARGS[@]}"
    --num-hosts "$N"
    --host-index "$i"
    # One process per host owns all of its chips: the DirectRunner in this process, one worker.
    --runner=DirectRunner
    --direct_num_workers=1
    --direct_running_mode=in_memory
  )
  if [[ -n "${OVERWRITE:-}" ]]; then args+=(--overwrite); fi
  printf '%q ' "${args[@]}"
}

start_host() {
  local i="$1" log rc job
  log="$(host_file "$i" log)"
  rc="$(host_file "$i" rc)"
  # Detached from the ssh session; the exit status lands in the .rc file when the run ends.
  job="rm -f $rc; $(extract_command "$i") > $log 2>&1; echo \$? > $rc"
  on_host "$i" "nohup setsid bash -c $(printf '%q' "$job") > /dev/null 2>&1 < /dev/null &
echo \"host $i started on \$(hostname); log: ~/$log\""
}

start() { in_parallel start_host; }

wait_all() {
  local i status done_count
  if [[ -n "${DRY_RUN:-}" ]]; then
    on_host 0 "cat $(host_file 0 rc) 2>/dev/null || true"
    return
  fi
  while true; do
    done_count=0
    for ((i = 0; i < N; i++)); do
      if ! selected "$i"; then done_count=$((done_count + 1)); continue; fi
      status="$(on_host "$i" "cat $(host_file "$i" rc) 2>/dev/null || true" | tr -d '[:space:]')"
      if [[ -z "$status" ]]; then continue; fi
      if [[ "$status" != 0 ]]; then
        echo "host $i (${HOST_TPU[$i]} worker ${HOST_WORKER[$i]}) failed with exit status $status; last log lines:" >&2
        on_host "$i" "tail -n 20 $(host_file "$i" log)" >&2 || true
        return 1
      fi
      done_count=$((done_count + 1))
    done
    echo "$(date -u +%H:%M:%S) $done_count of $N hosts finished"
    if [[ "$done_count" == "$N" ]]; then return 0; fi
    sleep "$POLL_SECONDS"
  done
}

merge() {
  local i inputs=()
  for ((i = 0; i < N; i++)); do inputs+=("$(host_dir "$i")"); done
  # The host folders lie inside OUTPUT, so their files are referenced in place: nothing is copied.
  on_host 0 "$(printf '%q ' "$REMOTE_VENV/bin/python" -m llm_activations merge --output "$OUTPUT" "${inputs[@]}")"
}

for step in "$@"; do
  case "$step" in
    preflight) preflight ;;
    install) install ;;
    start) start ;;
    wait) wait_all ;;
    merge) merge ;;
    all) preflight; start; wait_all; merge ;;
    *) echo "unknown step $step (preflight, install, start, wait, merge, all)" >&2; exit 2 ;;
  esac
done
