"""megatron_po: preference optimization of vision-language models on megatron-core."""

__version__ = "0.1.0"
