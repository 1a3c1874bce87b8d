#!/usr/bin/env bash
# Wheels the GPU image lacks for gpu_bench.py (apache-beam and google-crc32c for the extract row,
# tokamax for its attention rows, and the dependencies of theirs that the image does not have),
# downloaded into .whl/ for the device tool to carry, then the one `run` command that installs
# them and runs the GPU check. tokamax only with WITH_TOKAMAX=1: its dependencies (xprof, gcsfs,
# ...) add 62 MiB, too much beside Beam's 35 MiB under the 64 MiB carry limit (measured
# 2026-12-06); use it with --no-extract and without Beam (WITH_TOKAMAX=1 NO_BEAM=1).
#
#     bench/gpu_wheels.sh            # here, where PyPI is reachable (the GPU machine reaches nothing)
#
# pip resolves the dependencies for the GPU machine's Python (CPython 3.12, manylinux x86_64);
# every wheel of a package the image already holds is then dropped (IMAGE below: KINDS.md's list),
# so nothing the image has is shadowed by another version. .whl/ is git-ignored, never committed;
# the tool carries at most 64 MiB per call, working tree included.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

BEAM=$(grep -E '^apache-beam(\[[a-z,]*\])?==' requirements.txt | sed -E 's/\[[a-z,]*\]//')
CRC=$(grep -E '^google-crc32c==' requirements.txt)
TOKAMAX=$(grep -E '^tokamax==' requirements-test.txt | cut -d';' -f1 | tr -d ' ')
PACKAGES=()
[[ -z "${NO_BEAM:-}" ]] && PACKAGES+=("$BEAM" "$CRC")
[[ -n "${WITH_TOKAMAX:-}" ]] && PACKAGES+=("$TOKAMAX")
PY=${PYTHON:-python3}
LIMIT_MIB=64

# The 'cuda' image's Python packages (KINDS.md: "Python packages already there", read 2026-11-17,
# and safetensors, which its "pip list" row shows at 0.8.0).
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

normalize() { tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g'; }

# Keep the wheels out of git: as the device README says, through info/exclude (unless already ignored).
if ! git check-ignore -q .whl/probe.whl; then
    echo "/.whl/" >>"$(git rev-parse --git-path info/exclude)"
fi
rm -rf .whl
mkdir -p .whl

# With dependencies, for the target platform: pip picks versions that satisfy Beam's pins.
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_5_x86_64 \
    -d .whl "${PACKAGES[@]}"

image=" $(echo "$IMAGE" | normalize | tr '\n' ' ') "
for whl in .whl/*.whl; do
    name=$(basename "$whl" | cut -d- -f1 | normalize)
    if [[ "$image" == *" $name "* ]]; then
        rm "$whl"  # the image has it: carrying another version would shadow the image's
    fi
done

echo "wheels to carry (.whl/):"
ls -1 .whl | sed 's/^/  /'
bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total: $((bytes / 1024 / 1024)) MiB in $(ls .whl | wc -l) wheels (limit ${LIMIT_MIB} MiB with the working tree)"
if ((bytes > LIMIT_MIB * 1024 * 1024)); then
    echo "too large to carry" >&2
    exit 1
fi

cat <<'EOF'

device command (the tool's `run`, with carry [".whl"] and timeout_s 560; gpu_bench itself is cut at 8 minutes):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 timeout 480 python3 bench/gpu_bench.py 2>&1 | tee $OUT/gpu_bench.log
EOF
