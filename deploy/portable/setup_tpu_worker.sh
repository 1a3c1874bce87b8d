#!/usr/bin/env bash
# Prepare one TPU VM as a portable-runner worker with ENVIRONMENT=PROCESS: a Python venv with this
# package + jax[tpu] + apache-beam[gcp], and the Beam SDK boot launcher at /opt/apache/beam/boot.
# Run it ON each TPU VM, e.g. for every worker of a slice:
#
#   gcloud compute tpus tpu-vm scp dist/llm_activations-0.1.0-py3-none-any.whl \
#     deploy/portable/setup_tpu_worker.sh "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command 'WHEEL=/tmp/llm_activations-0.1.0-py3-none-any.whl bash /tmp/setup_tpu_worker.sh'
#
# Required: WHEEL (built with `python -m pip wheel --no-deps -w dist .` in this repository).
# Optional: WORKER_VENV (default /opt/llm-activations-venv), WORKER_PYTHON (3.11+; default python3).
# Needs docker on the VM (TPU VM images have it) to copy the boot launcher out of the Beam image.
set -euo pipefail

: "${WHEEL:?set WHEEL to the llm_activations wheel copied onto this VM}"
WORKER_VENV="${WORKER_VENV:-/opt/llm-activations-venv}"
WORKER_PYTHON="${WORKER_PYTHON:-python3}"
# Versions must match requirements.txt and the launcher (tests/test_deploy.py checks them).
PYTHON_VERSION=3.11
BEAM_VERSION=2.77.0
JAX_VERSION=0.10.2

sudo mkdir -p "$WORKER_VENV" /opt/apache
sudo chown "$(id -u):$(id -g)" "$WORKER_VENV"
"$WORKER_PYTHON" -m venv "$WORKER_VENV"
"$WORKER_VENV/bin/pip" install --upgrade pip
"$WORKER_VENV/bin/pip" install "jax[tpu]==$JAX_VERSION" "apache-beam[gcp]==$BEAM_VERSION" "$WHEEL"

# The SDK harness launcher, from the Beam image that matches the SDK version.
container="$(sudo docker create "apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}")"
sudo rm -rf /opt/apache/beam
sudo docker cp "$container:/opt/apache/beam" /opt/apache/beam
sudo docker rm "$container" > /dev/null

"$WORKER_VENV/bin/python" -c 'import jax, llm_activations; print(jax.local_device_count(), "devices:", jax.devices()[0].device_kind)'
ls -l /opt/apache/beam/boot
