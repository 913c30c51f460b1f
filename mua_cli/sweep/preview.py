"""`mua sweep --dry-run`: everything a sweep checks before its first trial, and its plan, in seconds. The model's
config is read (its layers' shapes, on PyTorch's meta device: no weights), the data opened and its fields
checked, the ranks checked against the layers, and the trials of the first round counted against the run
folder's store, read-only. Nothing is trained, downloaded beyond a config, or written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..spec.recipe import Recipe
from .grid import groups, plan
from .plan import expected_total
from .sizing import CPU_TOKEN_PARAMS_PER_S, Execution, cpu_slots, size_class, trials_per_pass

GPU_FLOOR_S = 0.015  # a small model's step on an H200 is launch-bound at about 15 ms (DESIGN.md, §5)


@dataclass
class Preview:
    run_dir: Path
    device: str
    groups: int  # (regime, rank) pairs, full finetuning counted as one
    first_round: int  # trials the first round plans
    stored: int  # of those, already in the run folder's store
    expected: int  # trials a sweep of this recipe usually ends with (the whole grid: fill and refinement)
    n_params: int
    max_lora_rank: int | None
    data: str  # what the data holds
    memory: dict[str, float] = field(default_factory=dict)  # GiB a slot holds, at the largest rank and full-ft
    seconds_per_trial: float | None = None
    time_basis: str = ""
    slots: int = 1  # trials side by side (the CPU's worker processes; on a GPU, one per device at least)
    checks: list[str] = field(default_factory=list)
    full_check: dict | None = None  # `--full-check`: the check's folder, steps a trial and expected trials

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "run_dir": str(self.run_dir)}


def preview(recipe: Recipe, run_dir: Path, device: str = "cpu", execution: Execution | None = None,
            storage: str | None = None, study: str | None = None) -> Preview:  # fmt: skip
    """The plan of `mua sweep` for `recipe` into `run_dir`, every input checked; raises the MuaError the sweep
    would. Writes nothing: the store, if there is one, is opened read-only."""
    import torch

    from ..train.shapes import layers_limit, rank_limit, skeleton
    from ..train.sources import open_source
    from .memory import GIB, estimate

    checks = []
    limit = rank_limit(recipe)  # the ranks against the layers, from the config alone
    model = skeleton(recipe.model)
    checks.append(f"model {recipe.model.name}: config read, layers' shapes known (no weights loaded)")
    if limit is None and recipe.lora_ranks:
        limit = layers_limit(model, recipe.model.targets, recipe.model.task)
    n_params = sum(p.numel() for p in model.parameters())
    data = _check_data(recipe, open_source(recipe.data.source))
    checks.append(f"data {recipe.data.source}: {data}")
    first = plan(recipe)
    stored = _stored(run_dir, storage, study, {s.key for s in first})
    expected = expected_total(recipe)
    ex = execution or Execution(device=device)
    task = SimpleNamespace(kind=recipe.model.task, input_ids=torch.empty(1, recipe.data.seq_len))
    memory = {}  # a slot holds its frozen base once, and one pass of k LoRA trials (or one full-ft trial)
    k = trials_per_pass(ex, recipe, n_params)
    with torch.device("meta"):
        if recipe.lora_ranks:
            m = estimate(model, task, recipe, max(recipe.lora_ranks))
            memory[f"LoRA rank {max(recipe.lora_ranks)}, {k} trial(s) a pass"] = (m.base + m.unit(k)) / GIB
        if recipe.wants_full:
            m = estimate(model, task, recipe, None)
            memory["full finetuning"] = (m.base + m.unit(1)) / GIB
    tokens = recipe.optim.steps * recipe.optim.batch_size * recipe.data.seq_len
    if device.startswith("cuda"):
        seconds, basis = (
            recipe.optim.steps * GPU_FLOOR_S,
            "a floor: a step's launch time on an H200; a large model's steps take longer",
        )
    else:
        seconds = tokens * n_params / CPU_TOKEN_PARAMS_PER_S
        basis = f"one CPU core's measured pace on the embedded default ({CPU_TOKEN_PARAMS_PER_S:.0e} tokens × params/s)"
        if size_class(n_params) != "small":
            basis += "; rough for a model this large"
        slots = cpu_slots(ex, recipe, n_params, expected - stored)  # worker processes of one core each
    return Preview(run_dir, device, len(groups(recipe)), len(first), stored, expected, n_params, limit, data,
                   memory, seconds, basis, slots if not device.startswith("cuda") else 1, checks)  # fmt: skip


def _check_data(recipe: Recipe, source) -> str:
    """What the data holds, after the checks a workload makes of its fields."""
    from ..errors import MuaError
    from ..train.sources import record_labels, text_fields

    task, d = recipe.model.task, recipe.data
    if source.text is not None:
        if task != "causal-lm":
            raise MuaError(f"data {d.source} is plain text; {task} needs records with a label field")
        return f"{len(source.text):,} characters of text"
    records = source.records
    if len(records) == 0:
        raise MuaError(f"data {d.source} holds no records")
    if task == "image-cls":
        from ..train.tasks import image_column

        image_column(records, d.text_field)
    else:
        text_fields(records, d.text_field)
    if task != "causal-lm":
        _, names = record_labels(records, d.label_field)
        return f"{len(records):,} records, {len(names)} classes"
    return f"{len(records):,} records"


def _stored(run_dir: Path, storage: str | None, study: str | None, keys: set[str]) -> int:
    """How many of `keys` the run folder's (or the shared study's) store already holds; 0 where there is none."""
    from ..errors import MuaError
    from .store import TrialStore

    if storage is None and study is None and not (Path(run_dir) / "trials.db").is_file():
        return 0
    try:
        return len(keys & TrialStore.open(Path(run_dir), storage, study).keys())
    except MuaError:
        return 0
