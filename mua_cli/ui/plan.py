"""`mua sweep --dry-run`: the checks and the plan, printed."""

from __future__ import annotations

from .console import stdout_console
from .runs import RUNS_DIR


def dry_run_plan(recipe, out, device, overrides, storage, study, quiet, full_check=False) -> None:
    """`mua sweep --dry-run`: the checks and the plan, printed; nothing run or written."""
    from ..api import preview_sweep, resolve_device
    from ..spec.data_identity import no_cache_writes
    from ..spec.recipe import load_recipe

    with no_cache_writes():  # the run folder's name hashes the data: nothing of it is kept
        r = load_recipe(recipe, **(overrides or {}))
        dev = resolve_device(device)
        run_dir = out or RUNS_DIR / f"{r.name}-{r.fingerprint()[:8]}"
    p = preview_sweep(r, run_dir, dev, storage, study, full_check)
    console = stdout_console(quiet)
    for line in p.checks:
        console.print(f"ok  {line}", markup=False, highlight=False)
    limit = f", ranks up to {p.max_lora_rank}" if p.max_lora_rank else ""
    lines = [
        f"run folder {p.run_dir} · device {p.device} · {r.settings_text()}",
        f"model: {p.n_params:,} parameters{limit}",
        f"first round: {p.first_round} trial(s) over {p.groups} (regime, rank) group(s)"
        + (f", {p.stored} already stored" if p.stored else ""),
        f"expected in all: about {p.expected} trial(s) (the grid's LRs the fit reads, refinements, extensions past "
        f"an edge)",
        "memory per slot (the GPU estimate): " + ("; ".join(f"{k} {v:.2f} GiB" for k, v in p.memory.items()) or "—"),
        f"estimated time: about {p.seconds_per_trial:.1f} s per trial, {p.slots} side by side: "
        f"{p.seconds_per_trial * max(p.expected - p.stored, 0) / p.slots / 60:.1f} min for the sweep ({p.time_basis})",
        "dry run: nothing was trained or written; drop --dry-run to run it",
    ]
    if p.full_check:
        c = p.full_check
        lines.insert(-1, f"then the full-finetuning check: about {c['expected']} trial(s) of full finetuning, "
                         f"{c['steps']} steps each, into {c['run_dir']}")  # fmt: skip
    for line in lines:
        console.print(line, markup=False, highlight=False)
