"""distributed_asac: bias mitigation with Attribute-Specific Adversarial Counterfactuals, distributed."""

from setuptools import find_packages, setup

setup(
    name="distributed_asac",
    version="0.1.0",
    description="Curriculum fine-tuning with attribute-specific adversarial counterfactuals (ASACs), on Accelerate",
    packages=find_packages(include=["distributed_asac", "distributed_asac.*"]),
    python_requires=">=3.10",
    # Exact versions verified together live in requirements.txt; these are the compatible ranges.
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "accelerate>=1.0",
        "mlflow>=3.0",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "fairlearn>=0.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pillow>=10.0",
        "numpy>=1.24",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15", "transformers>=4.40"],
        "tune": ["ray[tune]>=2.40"],
        "dev": ["pytest>=8.0", "captum>=0.7"],
    },
)
