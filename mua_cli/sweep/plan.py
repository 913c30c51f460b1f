"""Which trials a sweep adds, decided from the trials finished so far; the one planner of the local sweep
(stream.py, group by group as results come) and of a shared study's planner (worker.py, round by round).

Per (regime, rank) group, once none of its trials is running: the grid's LRs the fit reads around its best
(grid.fill), else one more LR where its optimum sits at the grid's edge (grid.extension), else (with `refine`)
half-octave LRs around its optimum (grid.refinement). Each of these reads the group's own trials only, so a group
moves on as soon as its own trials are in: a group never waits for another. Once every group has settled (none
adds anything) and nothing runs, one more seed where η*'s interval is still wider than 2× (`extra_seeds`): that
decision pools the noise over every group (science.rank_optima.estimate), so it alone waits for the whole sweep.

Round by round (`next_round`, what the shared study's planner does) makes the same decisions: a group's next
decision depends on its own trials alone, and the extra seeds come at the same point, when everything settled.
Every decision is a function of the stored trials, so a finished sweep resumed adds nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..science.optimum import seed_adjusted
from ..science.theory import FULL, lr_label, parse_lrs
from ..spec.recipe import Recipe
from ..spec.trial import TrialResult, TrialSpec
from .grid import extension, fill, groups, make_spec, plan, refinement

WIDE_LOG2 = 1.0  # an η* interval wider than a factor 2 gets one more seed near it
EXTRA_LRS = 2  # the LRs nearest η* it runs at (what 2 and 3 gave: benchmarks/default_plan.json)

Group = tuple[str, int]


@dataclass
class Decisions:
    """What the planner added, in lines a person reads (the sweep's summary shows them)."""

    added: list[str] = field(default_factory=list)  # one line per grid extension, fill or refinement
    at_edge: dict[Group, str] = field(default_factory=dict)  # groups still at an edge after max_extend


class Planner:
    """The sweep's decisions. `rows`: the finished trials it starts from, (spec, result) as stored; `done`: keys
    never to add again (finished, and with `retry_failed` off, failed). `note`: where each decision is said."""

    def __init__(self, recipe: Recipe, done: set[str], note: Callable[[str], None] = lambda _: None):
        self.recipe, self.done, self.note = recipe, done, note
        self.base_grid = parse_lrs(recipe.sweep.lrs)
        self.groups = groups(recipe)
        self.raw: dict[Group, list[tuple[float, float, int]]] = defaultdict(list)  # lr, metric (inf: diverged), seed
        self.has_extra: set[Group] = set()  # groups that ran a seed past the recipe's (extra_seeds, once ever)
        self.decisions = Decisions()

    # what is known
    def record(self, spec: TrialSpec, result: TrialResult) -> None:
        """A finished trial (stored or just run); a failed one is no point of any curve. `done` is the caller's:
        a stored failed trial is retried unless it says otherwise."""
        if spec.seed >= self.recipe.sweep.seeds:
            self.has_extra.add((spec.regime, spec.rank))
        if result.status == "failed":
            return
        value = math.inf if result.status == "diverged" else float(result.metric)
        self.raw[(spec.regime, spec.rank)].append((float(spec.lr), value, int(spec.seed)))

    def metrics(self, group: Group) -> dict[float, list[float]]:
        """LR → metrics (inf when diverged) of one group, each seed's curve moved onto one level first
        (optimum.seed_adjusted), so that a seed run at a few LRs only does not move their means."""
        rows = self.raw.get(group)
        if not rows:
            return {}
        lr, y, seed = (np.array(c) for c in zip(*rows, strict=True))
        fin = np.isfinite(y)
        y[fin] = seed_adjusted(np.log2(lr[fin]), y[fin], seed[fin])
        per: dict = defaultdict(list)
        for a, b in zip(lr, y, strict=True):
            per[float(a)].append(float(b))
        return per

    # the decisions
    def first(self) -> list[TrialSpec]:
        """The first round's trials not yet done (grid.plan)."""
        return [s for s in plan(self.recipe) if s.key not in self.done]

    def _new(self, group: Group, lrs, seed: int | None = None) -> list[TrialSpec]:
        seeds = range(self.recipe.sweep.seeds) if seed is None else (seed,)
        specs = [make_spec(self.recipe, *group, lr, s) for lr in lrs for s in seeds]
        return [s for s in specs if s.key not in self.done]

    def grow(self, group: Group) -> list[TrialSpec]:
        """The group's fill, else its extension: what it adds before it may be refined."""
        metrics = self.metrics(group)
        specs = self._new(group, fill(metrics, self.base_grid, bool(self.recipe.sweep.refine)))
        if specs:
            self._say(f"filling in: {len(specs)} trial(s) at the grid's LRs the fit reads around {_name(group)}'s "
                      "best LR")  # fmt: skip
            return specs
        new, why = extension(metrics, self.base_grid, self.recipe.sweep.max_extend)
        self.decisions.at_edge.pop(group, None)
        if new is None:
            if why.startswith("still"):
                self.decisions.at_edge[group] = f"{_name(group)}: {why}"
            return []
        specs = self._new(group, [new])
        if specs:
            self._say(f"{_name(group)}: best at the {why} edge of the grid, added lr={lr_label(new)}")
        return specs

    def refine(self, group: Group) -> list[TrialSpec]:
        """Half-octave LRs either side of the group's interior optimum (none without `refine`)."""
        if not self.recipe.sweep.refine:
            return []
        return self._new(group, refinement(self.metrics(group)))

    def settle(self, group: Group) -> list[TrialSpec]:
        """What one group adds now that none of its trials runs: grow, else refine; [] once it has settled."""
        specs = self.grow(group)
        if not specs and (specs := self.refine(group)):
            self._say(f"refining: {len(specs)} trial(s) at half-octave LRs around {_name(group)}'s optimum")
        return specs

    def extra_seeds(self, frame) -> list[TrialSpec]:
        """One more seed at the EXTRA_LRS LRs nearest η* wherever η*'s interval is still wider than a factor 2,
        once per group ever; `frame`: every stored trial (store.frame). Only once every group has settled.

        A flat or noisy curve is where another seed pays: the local fit's interval narrows with every point near
        the optimum, and nowhere else does a trial buy as much."""
        if not self.recipe.sweep.refine or frame.empty:
            return []
        from ..science.rank_optima import estimate  # pandas and the estimator, loaded only when a sweep refines

        wanted = set(self.groups)
        parts = [g for key, g in frame.groupby(["regime", "rank"]) if key in wanted]
        pending: list[TrialSpec] = []
        for o in estimate(parts)[0] if parts else []:
            if not o.usable or math.log2(o.hi / o.lo) <= WIDE_LOG2 or (o.regime, o.rank) in self.has_extra:
                continue  # located well enough, or given its extra seed already
            near = sorted((p["lr"] for p in o.points), key=lambda lr: abs(math.log2(lr) - o.log2_lr_star))
            pending.extend(self._new((o.regime, o.rank), near[:EXTRA_LRS], seed=self.recipe.sweep.seeds))
        if pending:
            self._say(f"refining: {len(pending)} trial(s) of one more seed near each optimum whose interval is "
                      "wider than 2×")  # fmt: skip
        return pending

    def next_round(self, frame: Callable) -> list[TrialSpec]:
        """Round by round, from everything finished: every group's growth; once none grows, every group's
        refinement; once none refines, the extra seeds (`frame()`: every stored trial)."""
        pending = [s for g in self.groups for s in self.grow(g)]
        if not pending:
            pending = [s for g in self.groups for s in self.refine(g)]
            if pending:
                self._say(f"refining: {len(pending)} trial(s) at half-octave LRs around each interior optimum")
        return pending or self.extra_seeds(frame())

    def _say(self, line: str) -> None:
        self.decisions.added.append(line)
        self.note(line)

    def at_edge(self) -> list[str]:
        return [self.decisions.at_edge[g] for g in self.groups if g in self.decisions.at_edge]


def _name(group: Group) -> str:
    return "full-ft" if group[0] == FULL else f"{group[0]} r={group[1]}"


def expected_total(recipe: Recipe) -> int:
    """A guess at the trials a fresh sweep of `recipe` ends with, for an ETA before the groups have decided: the
    first round, a fill of half the grid's other LRs, and with `refine` two half-octave LRs per group and seed
    and an extra seed at EXTRA_LRS LRs in every group (the embedded default: 18 + 9 + 12 + 12 = 51 against the 52
    it runs, benchmarks/default_plan.json). Extensions come on top."""
    first, n_groups, seeds = len(plan(recipe)), len(groups(recipe)), recipe.sweep.seeds
    rest = len(parse_lrs(recipe.sweep.lrs)) * n_groups * seeds - first
    if not recipe.sweep.refine:
        return first + rest  # the whole grid, as planned
    return first + math.ceil(rest / 2) + 2 * n_groups * seeds + EXTRA_LRS * n_groups


def meta(recipe: Recipe, spec: TrialSpec) -> dict:
    """What is stored with a trial besides its result: its LoRA settings and the recipe it ran."""
    return {
        **spec.lora_settings(recipe.optim.alpha0),
        "steps": recipe.optim.steps,
        "batch_size": recipe.optim.batch_size,
        "seq_len": recipe.data.seq_len,
        "fingerprint": recipe.fingerprint(),
        "recipe": recipe.outcome_fields(),
    }


def stored_trial(t) -> tuple[TrialSpec, TrialResult]:
    """A stored trial as the planner reads it: its spec and the result's status and metric."""
    a, p = t.user_attrs, t.params
    spec = TrialSpec(p["regime"], int(p["rank"]), float(p["lr"]), int(p["seed"]), a["key"])
    return spec, TrialResult(a.get("status", "failed"), a.get("metric", math.nan))
