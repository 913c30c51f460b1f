"""mua: pick learning rates across LoRA ranks and for full finetuning (Maximal-Update Adaptation)."""

__version__ = "0.1.0"
