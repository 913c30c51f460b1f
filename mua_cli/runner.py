"""Runs trials on one device: loads the base model and the data once, then one trial after another."""

from __future__ import annotations

import torch

from .errors import MuaError
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
    return device


class TrialRunner:
    def __init__(self, recipe: Recipe, device: str, listener=None):
        self.recipe, self.device, self.listener = recipe, device, listener
        work = load_workload(recipe, device, on_note=getattr(listener, "note", None))
        self.base, self.data, self.notes = work.base, work.task, work.notes  # data: a task (tasks.py)
        self.base.requires_grad_(False)

    def run(self, spec: TrialSpec) -> TrialResult:
        on_step = getattr(self.listener, "step", None)
        return run_trial(spec, self.base, self.data, self.recipe, self.device, on_step)
