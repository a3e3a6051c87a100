"""Install the sequence-model research codebase: Mamba (ssm/) against Transformers (attention/)."""

from setuptools import find_packages, setup

JAX_VERSION = "0.6.0"

setup(
    name="seqmodels",
    version="0.1.0",
    description="Mamba selective state space models and Transformer baselines in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ssm*", "attention*", "models*", "data*", "training*",
                                    "generation*", "experiments*", "benchmarks*", "configs*"]),
    py_modules=["train", "generate"],
    # The C++ source of the cpu_kernel scan, compiled on first use (ssm/cpu_kernel.py).
    package_data={"ssm": ["*.cc"]},
    install_requires=[
        f"jax>={JAX_VERSION}",
        "flax>=0.12.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "chex>=0.1.88",
        "absl-py>=2.1.0",
        "ml-collections>=1.0.0",
        "safetensors>=0.4.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-timeout>=2.3"],
        # CUDA 12 build of jaxlib with its GPU plugin, from PyPI.
        "gpu": [f"jax[cuda12]>={JAX_VERSION}"],
        # TPU runtime (libtpu); run on a Cloud TPU VM.
        "tpu": [f"jax[tpu]>={JAX_VERSION}"],
        # Other implementations compared in benchmarks/peers.py. The torch pin keeps pip on the
        # CPU build; an unpinned torch pulls a CUDA build of several GB.
        "peers": ["torch==2.13.0", "transformers>=4.45", "mambapy>=1.2"],
    },
)
