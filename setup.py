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
    entry_points={"console_scripts": ["llm-activations=llm_activations.cli:main"]},
)
