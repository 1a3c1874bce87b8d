#!/usr/bin/env bash
# Build and push the SDK container of deploy/dataflow/Dockerfile (TPU workers: JAX + libtpu + this
# package + the Beam boot launcher).
#
#   IMAGE=us-docker.pkg.dev/$PROJECT/$REPO/llm-activations:$(git rev-parse --short HEAD) \
#     deploy/dataflow/build_container.sh
#
# Needs docker with BuildKit (default since Docker 23) and push access to IMAGE's registry
# (`gcloud auth configure-docker us-docker.pkg.dev` for Artifact Registry).
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

: "${IMAGE:?set IMAGE to the image to build and push, e.g. us-docker.pkg.dev/PROJECT/REPO/llm-activations:TAG}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

run() {  # DRY_RUN=1: print the command, shell-quoted, instead of running it
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

# TPU VMs (ct5lp-*, ct6e-*, v4) are x86_64 hosts.
run docker build --platform linux/amd64 -f "$ROOT/deploy/dataflow/Dockerfile" -t "$IMAGE" "$ROOT"
run docker push "$IMAGE"
