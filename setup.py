"""sami_jax: SAMI (Self-Supervised Alignment with Mutual Information) in JAX."""

from setuptools import find_packages, setup

setup(
    name="sami_jax",
    version="0.1.0",
    description="SAMI (arXiv 2404.14313) in JAX: pure-function Llama/Mistral/Mixtral, sharded from day one.",
    packages=find_packages(include=["sami_jax", "sami_jax.*"]),
    package_data={"sami_jax.data": ["*.json", "constitution_files/*.json"], "sami_jax.models": ["*.cc"]},
    python_requires=">=3.11",
    # Lower bounds: what runs on Python 3.11 (jax 0.10.2) and on the GPU machine (Python 3.12, jax 0.11.2).
    install_requires=[
        "jax>=0.10.2",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "etils[epath]>=1.10",
        "jinja2>=3.1",
        "tqdm>=4.66",
        "absl-py>=2.1",
        "ml_collections>=1.0",
        "matplotlib>=3.9",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "gguf": ["gguf>=0.17"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # make test: two workers, one test file each at a time
            "torch==2.13.0",
            "transformers>=5.0",
            "accelerate>=1.0",
            "safetensors>=0.5",
            "gguf>=0.17",
            "ruff>=0.6",
            # Compile for TPU topologies on a CPU (sami_jax.aot, tests/test_aot.py). The wheel is Linux x86_64
            # only and 0.0.42.* is what jax 0.10.x's [tpu] extra pins; Python 3.11 is where this project runs
            # jax 0.10.x (newer jax needs a newer libtpu). Elsewhere test_aot.py skips.
            'libtpu==0.0.42.1; platform_system == "Linux" and platform_machine == "x86_64" '
            'and python_version == "3.11"',
        ],
    },
)
