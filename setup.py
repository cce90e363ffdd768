"""distbatch: data-parallel training of TensorFlow/Keras 3 models across
GPUs and machines, with large-batch recipes and batch-size measurement."""
from setuptools import find_packages, setup

setup(
    name="distbatch",
    version="0.1.0",
    description="Data-parallel TensorFlow training, large-batch recipes, and "
                "throughput-vs-generalization benchmarks per global batch size",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["distbatch", "distbatch.*"]),
    # The operators' CRD schemas, trimmed (distbatch/launch/k8s_schemas/README.md).
    package_data={"distbatch.launch": ["k8s_schemas/*.json", "k8s_schemas/README.md"]},
    install_requires=[
        "numpy>=1.26",
        "tensorboard>=2.20",
        "matplotlib>=3.8",
        # Validates `distbatch launch k8s` manifests against the vendored CRD schemas.
        "jsonschema>=4",
    ],
    extras_require={
        # CPU-only machines (CI, laptops, the logical-device demos).
        "cpu": ["tensorflow-cpu==2.21.0"],
        # NVIDIA GPUs: TF's own CUDA wheels.
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        # Horovod must be built against the installed TF; see scripts/build_horovod.sh.
        "horovod": ["horovod==0.28.1", "mpi4py>=4.0"],
        "datasets": ["mnist1d==0.0.2.post1", "scikit-learn>=1.4"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["distbatch=distbatch.cli:main"]},
)
