"""Fused GPU kernels for a model's elementwise work: Liger Kernel's RMSNorm, rotary embedding and SwiGLU
(Triton), in place of the Hugging Face modules' chains of small kernels, where liger-kernel is installed
and knows the model's type (Llama, Qwen, Mistral, Gemma, …; `pip install liger-kernel`).

Why: with the step a CUDA graph, a small model's GPU time goes mostly to elementwise kernels (casts, norms,
rotary embeddings, SiLU), each reading and writing whole activations (docs/performance.md). The loss, and so
each trial's metric, stays mua's own: Liger's fused cross-entropy is not used.

Liger patches two things: the given model's modules (kept), and, process-wide, the transformers modeling
module (the rotary function every instance calls, the classes later models are built from). The second is
narrowed at once (classes back; the rotary function runs Liger's kernel for GPU tensors only) and undone when
the sweep ends, so that nothing else in the process (a CPU model, the plain loop of benchmarks/gpu_speed.py)
runs Liger's kernels unasked.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from collections.abc import Callable

import torch

KERNELS = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def _nothing() -> None: ...


class _OptionalBackends(logging.Filter):
    """Liger warns, the first time an op runs, about each optional backend it cannot import (CuTe DSL, Ascend
    NPUs): two lines per op in every sweep's output on a plain CUDA machine. mua runs its Triton kernels, which
    those lines are not about."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Backend impl ") and "could not be imported" in message)


def _quiet_optional_backends() -> None:
    logger = logging.getLogger("liger_kernel.backends.registry")
    if not any(isinstance(f, _OptionalBackends) for f in logger.filters):
        logger.addFilter(_OptionalBackends())


def fuse(model: torch.nn.Module, device: str, on_note: Callable[[str], None] | None = None) -> Callable[[], None]:
    """Patches `model` (on a GPU) with Liger's kernels; returns what undoes the process-wide part."""
    note = on_note or (lambda _m: None)
    if not device.startswith("cuda"):
        return _nothing
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        note("liger-kernel is not installed: the model's own kernels run (pip install liger-kernel for fused ones)")
        return _nothing
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        note(f"no fused kernels for model type {model_type!r}: the model's own kernels run")
        return _nothing
    saved = _namespaces()
    accepted = inspect.signature(apply).parameters
    try:
        apply(model=model, **{k: v for k, v in KERNELS.items() if k in accepted})
    except Exception as e:  # noqa: BLE001 — a Liger that does not fit this transformers: run without it
        _restore(saved)
        note(f"fused kernels could not be applied ({type(e).__name__}: {e}); the model's own kernels run")
        return _nothing
    _confine(saved)
    _quiet_optional_backends()
    frozen_norms(model)
    note(f"fused kernels (liger-kernel) for {model_type}: RMSNorm, rotary embedding, SwiGLU")
    return lambda: _restore(saved)


def _namespaces() -> dict[str, dict]:
    return {name: dict(vars(m)) for name, m in list(sys.modules.items())
            if name.startswith("transformers.models.") and m is not None}  # fmt: skip


def _confine(saved: dict[str, dict]) -> None:
    """What Liger replaced process-wide, narrowed at once: classes go back (the model's modules are patched
    already; a model built later, on the CPU say, must not get Triton modules), and functions (the rotary
    embedding, which every instance calls from the module) run Liger's kernel on GPU tensors only."""
    for name, before in saved.items():
        if (module := sys.modules.get(name)) is None:
            continue
        space = vars(module)
        for key, own in before.items():
            new = space.get(key)
            if new is own:
                continue
            if isinstance(own, type):
                space[key] = own
            elif callable(own) and callable(new):
                space[key] = _on_gpu(new, own)


def _on_gpu(fused: Callable, own: Callable) -> Callable:
    def call(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return (fused if first is not None and first.is_cuda else own)(*args, **kwargs)

    return call


def _restore(saved: dict[str, dict]) -> None:
    for name, before in saved.items():
        if (module := sys.modules.get(name)) is None:
            continue
        space = vars(module)
        for key in [k for k in space if k not in before]:
            del space[key]
        for key, value in before.items():
            if space.get(key) is not value:
                space[key] = value


def frozen_norms(model: torch.nn.Module) -> None:
    """Liger's RMSNorm backward always computes the weight's gradient too (a reduction over every token); a
    frozen norm (LoRA) needs only the input's. torch's fused RMSNorm skips what is not asked for, and runs
    faster (`benchmarks/rms_norm.py`).
    """
    for m in model.modules():
        if m._get_name() == "LigerRMSNorm" and getattr(m, "offset", None) == 0:  # Gemma's (1 + w) keeps Liger's
            # Liger's function, not its method bound to `m`: a deepcopy (each trial's model) would keep
            # that method bound to the base's module and its weights
            m.forward = types.MethodType(functools.partial(_norm_forward, liger=m.forward.__func__), m)


def _norm_forward(self, x: torch.Tensor, liger: Callable) -> torch.Tensor:
    w = self.weight
    if w is None or w.requires_grad or w.dtype != x.dtype or not x.is_cuda:
        return liger(self, x)
    return torch.nn.functional.rms_norm(x, w.shape, w, self.variance_epsilon)
