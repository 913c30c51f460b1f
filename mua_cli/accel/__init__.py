"""GPU speed-ups that change no result beyond floating-point rounding: CUDA-graph steps (graphed), attention
kernels (attention), Liger's fused kernels (fused), LoRA GEMMs (lora_gpu, lora_addmm), and `prepare`, the one
call through which a training step gets them.

Knows models and tensors, not recipes or trials. May import: torch, peft, transformers; nothing of mua's
outside this folder.
"""
