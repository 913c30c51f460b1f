"""Runs trials on one device: loads the base model and the data once, then one unit of work after another
(a unit is one trial, or several LoRA trials that differ only in LR and train side by side: batched.py)."""

from __future__ import annotations

import torch

from .errors import MuaError
from .fused import fuse
from .graphed import empty_cache
from .recipe import Recipe
from .tasks import load_workload
from .train import run_trial
from .trial import TrialResult, TrialSpec


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MuaError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise MuaError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda:"):
        index, n = device[5:], torch.cuda.device_count()
        if not index.isdigit() or int(index) >= n:
            raise MuaError(f"--device {device}: this machine has GPUs cuda:0 … cuda:{n - 1}")
    return device


class TrialRunner:
    def __init__(self, recipe: Recipe, device: str, listener=None, graphs: bool = True, fused: bool = True):
        self.recipe, self.device, self.graphs = recipe, device, graphs
        self.on_step, self.on_note = getattr(listener, "step", None), getattr(listener, "note", None)
        if device.startswith("cuda:"):
            torch.cuda.set_device(device)  # CUDA graphs and streams are made on the current device
        work = load_workload(recipe, device, on_note=self.on_note)
        self.base, self.data, self.notes = work.base, work.task, work.notes  # data: a task (tasks.py)
        self.base.requires_grad_(False)
        if device.startswith("cuda"):
            self.base.to(device)  # once, not per trial: each trial's copy is then made on the GPU
        # each trial's model is a copy of the base, so it inherits the base's fused kernels
        self._unfuse = fuse(self.base, device, self.on_note) if fused else lambda: None

    def close(self) -> None:
        """Undoes what fusing the kernels changed beyond this runner's models (fused.py)."""
        self._unfuse()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    def run(self, spec: TrialSpec) -> TrialResult:
        return run_trial(spec, self.base, self.data, self.recipe, self.device, self.on_step, self.graphs, self.on_note)

    def run_unit(self, unit: list[TrialSpec]) -> list[TrialResult]:
        results = self._run_unit(unit)
        if self.device.startswith("cuda"):  # the GPU's high-water mark so far (every slot on it), stored with the trial
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            for r in results:
                r.info["peak_memory_gib"] = round(peak, 2)
        return results

    def _run_unit(self, unit: list[TrialSpec]) -> list[TrialResult]:
        """Several trials batched; a group too big for the GPU's memory is split in halves until it fits."""
        if len(unit) == 1:
            return [self.run(unit[0])]
        from .batched import run_batched

        try:
            return run_batched(
                unit, self.base, self.data, self.recipe, self.device, self.on_step, self.graphs, self.on_note
            )
        except torch.cuda.OutOfMemoryError:
            empty_cache()
            half = len(unit) // 2
            return self._run_unit(unit[:half]) + self._run_unit(unit[half:])
