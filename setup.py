"""distributed_asac: bias mitigation with Attribute-Specific Adversarial Counterfactuals, distributed.

`pip install .` gives the whole package: the CLIs below, the Ray Tune sweeps (`tune/`) and everything they
import at run time (tests/test_install.py checks that install_requires covers every import).
"""

from setuptools import find_packages, setup

setup(
    name="distributed_asac",
    version="0.1.0",
    description="Curriculum fine-tuning with attribute-specific adversarial counterfactuals (ASACs), on Accelerate",
    packages=find_packages(include=["distributed_asac", "distributed_asac.*", "tune", "tune.*"]),
    package_data={"tune": ["README.md"]},
    python_requires=">=3.10",
    # Exact versions verified together live in requirements.txt; these are the compatible ranges.
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "accelerate>=1.0",
        "mlflow>=3.0",
        "pandas>=1.5",  # the MLflow tables of a comparison and a sweep (tracking.log_table); mlflow needs it too
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "captum>=0.7",  # Integrated Gradients in every evaluation (analysis.py)
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pillow>=10.0",
        "numpy>=1.24",
        "scipy>=1.10",  # Student-t quantiles of the intervals over seeds (stats.py)
        "filelock>=3.0",  # the image cache and the sweep's base cache
        "ray[tune]>=2.40",  # tune/ (asac-sweep)
    ],
    extras_require={
        # DeepSpeed ZeRO through `accelerate launch --config_file launch/deepspeed_zero2.yaml`
        "deepspeed": ["deepspeed>=0.15", "transformers>=4.40"],
        "dev": ["pytest>=8.0", "fairlearn>=0.10"],  # fairlearn: the tests' independent metric reference
    },
    entry_points={
        "console_scripts": [
            "asac-finetune=distributed_asac.finetune:main",
            "asac-demo=distributed_asac.demo:main",
            "asac-generate=distributed_asac.data.synthetic:main",
            "asac-sweep=tune.sweep:main",
        ],
    },
)
