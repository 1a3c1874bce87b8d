#!/usr/bin/env bash
# Extract activations on Dataflow with TPU workers.
#
# Each Dataflow worker is one single-host TPU VM (v5e or v6e, 2x2 = 4 chips). The options below make
# it run ONE SDK process with ONE DoFn thread, so the model is loaded once per VM and that one
# process owns all of the VM's chips as one mesh (a second process could not open the TPU).
#
#   PROJECT=my-project REGION=us-west4 BUCKET=gs://my-bucket \
#   IMAGE=us-docker.pkg.dev/my-project/beam/llm-activations:v1 \
#     deploy/dataflow/run_dataflow_tpu.sh
#
# Required: PROJECT, REGION (one with TPU capacity for the type), BUCKET (gs://...), IMAGE (pushed
#           by deploy/dataflow/build_container.sh from this same checkout).
# Optional: TPU=v5e|v6e (default v5e), MODEL, INPUT, LAYERS (space-separated), OUTPUT, MAX_WORKERS,
#           NUM_SHARDS, SEQ_LEN, BATCH_SIZE, MAX_DOCS, MESH (DATA,MODEL), JOB_NAME, DISK_SIZE_GB,
#           PYTHON (the launcher's interpreter; it needs this package and apache-beam[gcp]).
#           EXTRA_BEAM_ARGS: more Beam options, space-separated (e.g. --network=... --subnetwork=...).
# DRY_RUN=1 prints the command instead of submitting the job.
#
# Input: an hf:// split is streamed in ONE work unit by the current planner (its length is unknown
# up front), so only one worker would extract. For a job that fans out, copy the split's parquet
# files to GCS and pass INPUT='gs://BUCKET/fineweb-edu/sample/10BT/*.parquet' (see deploy/README.md).
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

: "${PROJECT:?set PROJECT to your Google Cloud project id}"
: "${REGION:?set REGION to a Dataflow region with TPU capacity for TPU=${TPU:-v5e}}"
: "${BUCKET:?set BUCKET to a gs:// bucket for staging, temp files and output}"
: "${IMAGE:?set IMAGE to the SDK container built by deploy/dataflow/build_container.sh}"
if [[ "$BUCKET" != gs://* ]]; then
  echo "BUCKET must be a gs:// URL (got $BUCKET)" >&2
  exit 2
fi
BUCKET="${BUCKET%/}"

# Dataflow TPU workers: the accelerator and the machine type must be a supported pair.
TPU="${TPU:-v5e}"
case "$TPU" in
  v5e) ACCELERATOR="type:tpu-v5-lite-podslice;topology:2x2"; MACHINE_TYPE="ct5lp-hightpu-4t" ;;
  v6e) ACCELERATOR="type:tpu-v6e-slice;topology:2x2"; MACHINE_TYPE="ct6e-standard-4t" ;;
  *) echo "TPU must be v5e or v6e (got $TPU)" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-python3}"
OUTPUT="${OUTPUT:-$BUCKET/activations/qwen2.5-7b-fineweb-edu}"
MAX_WORKERS="${MAX_WORKERS:-8}"
JOB_NAME="${JOB_NAME:-llm-activations-$(date -u +%Y%m%d-%H%M%S)}"

extract_args "$OUTPUT"

BEAM_ARGS=(
  --runner=DataflowRunner
  --project="$PROJECT"
  --region="$REGION"
  --job_name="$JOB_NAME"
  --temp_location="$BUCKET/tmp"
  --staging_location="$BUCKET/staging"
  # Workers run the custom container (JAX + libtpu + this package + the Beam boot launcher).
  --sdk_container_image="$IMAGE"
  --experiments=use_runner_v2
  # TPU workers: accelerator type/topology and the machine type that carries it.
  --dataflow_service_options="worker_accelerator=$ACCELERATOR"
  --machine_type="$MACHINE_TYPE"
  # One accelerator owner per VM: one SDK container (not one per vCPU) and one work thread in it.
  --experiments=no_use_multiple_sdk_containers
  --number_of_worker_harness_threads=1
  --max_num_workers="$MAX_WORKERS"
  # Room for the container image and the checkpoint download (Qwen2.5-7B: ~15 GB in bf16).
  --disk_size_gb="${DISK_SIZE_GB:-200}"
  "${EXTRA_BEAM_ARR[@]}"
)

run "$PYTHON" -m llm_activations extract "${EXTRACT_ARGS[@]}" "${BEAM_ARGS[@]}"
