#!/usr/bin/env bash
# Extract activations on Flink or Spark running on a cluster of TPU VMs, through Beam's portable
# runner. Each TPU VM runs one TaskManager (Flink) / one executor (Spark) with ONE task slot / core,
# and --sdk_worker_parallelism=1 makes it start ONE Python SDK process: the model is loaded once per
# VM and that process owns all of the VM's chips. Set the cluster up first: deploy/portable/README.md.
#
#   ENGINE=flink FLINK_MASTER=flink-jm:8081 PARALLELISM=4 OUTPUT=gs://my-bucket/activations/run1 \
#     deploy/portable/run_portable.sh
#
# ENGINE (default flink):
#   flink       --runner=FlinkRunner  --flink_master=$FLINK_MASTER (Beam starts a Flink job server here;
#               needs Java 11+ on this machine)
#   spark       --runner=SparkRunner  --spark_master_url=$SPARK_MASTER_URL (likewise, a Spark job server)
#   job_server  --runner=PortableRunner --job_endpoint=$JOB_ENDPOINT (a job server you started, e.g.
#               the apache/beam_flink*_job_server or apache/beam_spark*_job_server container)
# ENVIRONMENT (default PROCESS):
#   PROCESS     the TaskManager starts BOOT (default /opt/apache/beam/boot) on its VM, running the SDK in
#               WORKER_VENV (default /opt/llm-activations-venv; set up by setup_tpu_worker.sh)
#   DOCKER      the TaskManager runs IMAGE (deploy/dataflow/Dockerfile); the container must see the
#               TPU devices (/dev/accel* or /dev/vfio) - see the README before choosing it
# Required: OUTPUT (gs://... or a filesystem every VM shares), and FLINK_MASTER + PARALLELISM (the
#           number of TPU VMs) / SPARK_MASTER_URL / JOB_ENDPOINT for the ENGINE.
# Optional: MODEL, INPUT, LAYERS (space-separated), SEQ_LEN, BATCH_SIZE, NUM_SHARDS, MAX_DOCS, MESH,
#           FLINK_VERSION, EXTRA_BEAM_ARGS, PYTHON (this machine's interpreter with this package).
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
# shellcheck source=deploy/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

: "${OUTPUT:?set OUTPUT to a folder every TPU VM can write, e.g. gs://my-bucket/activations/run1}"
ENGINE="${ENGINE:-flink}"
ENVIRONMENT="${ENVIRONMENT:-PROCESS}"
PYTHON="${PYTHON:-python3}"

case "$ENGINE" in
  flink)
    : "${FLINK_MASTER:?set FLINK_MASTER to the REST address of the Flink JobManager, e.g. flink-jm:8081}"
    : "${PARALLELISM:?set PARALLELISM to the number of TPU VMs (one task slot each)}"
    ENGINE_ARGS=(--runner=FlinkRunner --flink_master="$FLINK_MASTER" --parallelism="$PARALLELISM")
    if [[ -n "${FLINK_VERSION:-}" ]]; then ENGINE_ARGS+=(--flink_version="$FLINK_VERSION"); fi
    ;;
  spark)
    : "${SPARK_MASTER_URL:?set SPARK_MASTER_URL to the Spark master, e.g. spark://spark-master:7077}"
    ENGINE_ARGS=(--runner=SparkRunner --spark_master_url="$SPARK_MASTER_URL")
    ;;
  job_server)
    : "${JOB_ENDPOINT:?set JOB_ENDPOINT to the Beam job server, e.g. localhost:8099}"
    ENGINE_ARGS=(--runner=PortableRunner --job_endpoint="$JOB_ENDPOINT")
    # A Flink job server reads --parallelism; a Spark job server takes its cores from the cluster.
    if [[ -n "${PARALLELISM:-}" ]]; then ENGINE_ARGS+=(--parallelism="$PARALLELISM"); fi
    ;;
  *) echo "ENGINE must be flink, spark or job_server (got $ENGINE)" >&2; exit 2 ;;
esac

case "$ENVIRONMENT" in
  PROCESS)
    BOOT="${BOOT:-/opt/apache/beam/boot}"
    WORKER_VENV="${WORKER_VENV:-/opt/llm-activations-venv}"
    # The boot launcher runs the SDK harness with the first python on PATH: the workers' venv,
    # used as is (no per-start virtualenv), so it imports this package and jax[tpu].
    ENV_CONFIG="$(printf '{"command": "%s", "env": {"PATH": "%s/bin:/usr/local/bin:/usr/bin:/bin", "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT": "1"}}' "$BOOT" "$WORKER_VENV")"
    ENV_ARGS=(--environment_type=PROCESS --environment_config="$ENV_CONFIG")
    ;;
  DOCKER)
    : "${IMAGE:?set IMAGE to the SDK container built from deploy/dataflow/Dockerfile}"
    ENV_ARGS=(--environment_type=DOCKER --environment_config="$IMAGE")
    ;;
  *) echo "ENVIRONMENT must be PROCESS or DOCKER (got $ENVIRONMENT)" >&2; exit 2 ;;
esac

extract_args "$OUTPUT"

BEAM_ARGS=(
  "${ENGINE_ARGS[@]}"
  "${ENV_ARGS[@]}"
  # One SDK process per worker node (TaskManager / executor): one model, one TPU owner per VM.
  --sdk_worker_parallelism=1
  "${EXTRA_BEAM_ARR[@]}"
)

run "$PYTHON" -m llm_activations extract "${EXTRACT_ARGS[@]}" "${BEAM_ARGS[@]}"
