"""megatron_po: preference optimization (ACPO, DPO, ...) of vision-language models on megatron-core."""

from setuptools import find_packages, setup

# Exact pins: megatron-core 0.16.1 is the newest release for Python 3.11, and torch 2.13.0 is the CPU wheel the
# laptop/CI path is measured on (other specs pull multi-GB CUDA builds). Re-check MEGATRON_ON_CPU.md on upgrades.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "psutil==7.2.2",  # needed by dist_checkpointing.save, not declared by megatron-core
    "numpy==2.4.6",
    "pyyaml==6.0.3",
    "pillow==13.0.0",
    "sentencepiece==0.2.3",
    "tensorboard==2.21.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "safetensors==0.8.0",  # the reference log-prob cache (no pickle)
]

setup(
    name="megatron_po",
    version="0.1.0",
    description="Megatron-core trainer for preference optimization of vision-language models",
    packages=find_packages(include=["megatron_po", "megatron_po.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # GPU image only (docker/: NGC ships it): never on a CPU machine, it breaks megatron imports there. The range
        # megatron-core 0.16.1 declares; no flash-attn: TE runs attention in cuDNN's fused kernels on H100
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
        # conversion parity tests and tools/hf_parity.py run against transformers itself (5.x; 4.x configs and
        # checkpoints stay readable: the converter reads config.json, not transformers' classes); peft: the LoRA
        # export's test loads `megatron-to-hf --adapter` directories with PeftModel (pulls accelerate 1.16.0)
        "hf": ["transformers==5.23.0", "peft==0.22.0"],
        # data.format=hf: Hugging Face datasets on disk (save_to_disk directories, parquet, arrow)
        "data": ["datasets==5.2.0"],
        "wandb": ["wandb==0.31.0"],  # train.wandb_project
        "dev": ["pytest==9.2.0"],
    },
    entry_points={"console_scripts": ["megatron-po=megatron_po.cli:main"]},
)
