"""Recipes: what to finetune (model), on what (data), how each trial trains (optim), and which trials run
(sweep). A recipe file is YAML of flat keys (see `recipes/tiny.yaml`), or of those four sections; command-line
flags override it. The keys, their types and ranges live in config.py."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..errors import MuaError
from ..science.theory import FULL, parse_ranks
from .config import KEYS, MIN_STEPS, OUTCOME_KEYS, SECTIONS, DataSpec, ModelSpec, Optim, SweepSpec, typed
from .data_identity import SCHEME, data_identity, is_content

# An installed wheel ships the recipes inside the package; a checkout (and an editable install) keeps them in
# recipes/ beside it
_PACKAGED = Path(__file__).resolve().parent.parent / "recipes"
RECIPES_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPE = "tiny"
# `--task seq-cls` with no recipe and no model: the embedded encoder on embedded classification data
TASK_DEFAULT_RECIPES = {"seq-cls": "tiny-cls"}
FULL_CHECK_FRACTION = 4  # `--full-check` trains full finetuning for 1/4 of the recipe's steps
EMBEDDED_MODELS = {"embedded:tiny": "causal-lm", "embedded:encoder": "seq-cls"}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a sweep's trials, in four typed sections. `Recipe.of(steps=50, ...)` builds one
    from flat keys; `recipe.replace(...)` changes some."""

    name: str = "tiny"
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: Optim = field(default_factory=Optim)
    sweep: SweepSpec = field(default_factory=SweepSpec)

    @classmethod
    def of(cls, source: str = "recipe", **flat: Any) -> Recipe:
        """A checked recipe from flat keys (the YAML's and the flags' names), each typed and range-checked."""
        known = ["name", "description", *KEYS]
        unknown = sorted(map(str, set(flat) - set(known)))
        if unknown:
            raise MuaError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        sections: dict[str, dict] = {s: {} for s in SECTIONS}
        for key, v in flat.items():
            if key in KEYS:
                sections[KEYS[key].section][KEYS[key].field] = typed(key, v, source)
        for key in ("name", "description"):
            if key in flat and not isinstance(flat[key], str):
                raise MuaError(f"{source}: {key} must be text, not {flat[key]!r}")
        if "name" in flat and not _plain(flat["name"]):  # it names the run folder under runs/
            raise MuaError(f"{source}: name must be a plain name, not a path or nothing, not {flat['name']!r}")
        top = {k: flat[k] for k in ("name", "description") if k in flat}
        recipe = cls(**top, **{s: SECTIONS[s](**kw) for s, kw in sections.items()})
        if (problem := embedded_problem(recipe.model)) is not None:
            raise MuaError(f"{source}: {problem}")
        if recipe.optim.metric == "eval" and recipe.data.eval_fraction == 0:
            raise MuaError(
                f"{source}: metric: eval scores held-out data, but eval_fraction is 0 (nothing held out): set "
                "eval_fraction (e.g. 0.1), or metric: train"
            )
        return recipe

    def flat(self) -> dict:
        """Every key by its YAML name: what a recipe file, a study and a run folder's recipe.yaml hold."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        for key, k in KEYS.items():
            v = getattr(getattr(self, k.section), k.field)
            out[key] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **flat: Any) -> Recipe:
        return Recipe.of(**{**self.flat(), **flat})

    @property
    def rank_list(self) -> list[int | str]:
        return parse_ranks(self.sweep.ranks)

    @property
    def lora_ranks(self) -> list[int]:
        return [r for r in self.rank_list if r != FULL]

    @property
    def wants_full(self) -> bool:
        return FULL in self.rank_list

    def full_check(self) -> Recipe:
        """`mua sweep --full-check`'s sweep: full finetuning alone at a quarter of the steps, with this recipe's
        model, data, batch, LRs and seeds (docs/validation.md, the fourth run, measured what it is worth)."""
        return self.replace(ranks=FULL, steps=max(MIN_STEPS, self.optim.steps // FULL_CHECK_FRACTION))

    def outcome_fields(self) -> dict:
        """The keys that change a trial's outcome (config.py's `outcome` metadata), resolved: local data by its
        content (data_identity.py), so that an edited file makes new trials and two spellings of one file do not."""
        flat = self.flat()
        out = {k: flat[k] for k in OUTCOME_KEYS}
        out["data"] = self.data_id
        return out

    @cached_property
    def data_id(self) -> str:
        """The data's identity (data_identity.py), worked out once per recipe: every trial's key and stored
        record carries it, and for a local folder it stats and hashes the folder's every file. A recipe names
        its data as it was when first asked; a recipe loaded again reads it again."""
        return data_identity(self.data.source)

    def fingerprint(self) -> str:
        blob = json.dumps(self.outcome_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def pin(self) -> dict:
        """What a run folder's recipe.yaml (and a shared study) records of this recipe's identity."""
        data = self.outcome_fields()["data"]
        return {"fingerprint": self.fingerprint(), "fingerprint_scheme": SCHEME, "data_identity": data}

    def pin_mismatch(self, old: dict, where: str) -> str | None:
        """Why `where`, pinned to `old` (recipe.yaml's mapping or a study's info), cannot take this recipe's trials;
        None when it can. Each reason names what differs and what to do."""
        if not old.get("fingerprint") or old["fingerprint"] == self.fingerprint():
            return None
        new_id = self.outcome_fields()["data"]
        if old.get("fingerprint_scheme", 1) != SCHEME and is_content(new_id):
            return (
                f"{where} was swept by an older mua, which knew the data file {self.data.source} by its path, not its "
                "content: its trials cannot be matched to this file's content. Sweep into a new --out folder"
            )
        if old.get("data_identity") and old["data_identity"] != new_id:
            then, now = (x.split(":", 1)[-1][:12] if is_content(x) else x for x in (old["data_identity"], new_id))
            return (
                f"{where} was swept on other data: {self.data.source} is not what it was (content {then}… then, "
                f"{now}… now). Sweep into a new --out folder, or restore the data to resume"
            )
        flat = self.flat()
        keys = [k for k in OUTCOME_KEYS if k != "data" and k in old and _norm(old[k]) != _norm(flat[k])]
        changed = [f"{k} {old[k]!r} → {flat[k]!r}" for k in keys]
        what = "; ".join(changed) if changed else "steps, batch, model, data..."
        return f"{where} was swept with other settings ({what}); use a new --out folder, or the same settings to resume"

    def to_dict(self) -> dict:
        return self.flat()

    def settings_text(self) -> str:
        o, b1, b2 = self.optim, *self.optim.betas
        return (
            f"AdamW(β=({b1}, {b2}), ε={o.eps:g}, weight decay {o.weight_decay:g}), "
            f"clip {o.grad_clip:g}, warmup {o.warmup_frac:.0%} then cosine to {o.min_lr_ratio:g}× peak, "
            f"{o.steps} steps, batch {o.batch_size} × {self.data.seq_len}"
        )


def embedded_problem(m: ModelSpec) -> str | None:
    """Why an `embedded:` model cannot serve the recipe's task, or None: said when the recipe is read, before
    any model or data loads."""
    if not m.embedded:
        return None
    task = EMBEDDED_MODELS.get(m.name)
    if task is None:
        known = ", ".join(f"{k} ({v})" for k, v in EMBEDDED_MODELS.items())
        return f"no embedded model {m.name!r}; the embedded models are {known}"
    if task != m.task:
        if m.name == "embedded:tiny" and m.task == "seq-cls":
            return (
                "the embedded model embedded:tiny is a causal LM, not a classifier; for --task seq-cls leave "
                "--model and --recipe out (the embedded encoder, recipe tiny-cls) or give --model NAME_OR_PATH"
            )
        return f"the embedded model {m.name} is for --task {task}; task {m.task} needs --model NAME_OR_PATH"
    if m.name == "embedded:encoder" and (m.config or m.pretrain):
        return "embedded:encoder is shipped pretrained: model_config and pretrain apply to embedded:tiny only"
    return None


def find_recipe(name_or_path: str | None) -> Path:
    name = name_or_path or DEFAULT_RECIPE
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise MuaError(f"recipe file {name} does not exist")
        return p
    cand = RECIPES_DIR / f"{name}.yaml"
    if cand.is_file():
        return cand
    raise MuaError(f"no recipe named {name!r}; `mua recipes` lists them, or give a path to a .yaml file")


def list_recipes() -> list[tuple[str, Path, str]]:
    out = []
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            desc = (yaml.safe_load(p.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(unreadable YAML)"
        out.append((p.stem, p, str(desc).strip().splitlines()[0] if desc else ""))
    return out


def load_recipe(name_or_path: str | None = None, **overrides) -> Recipe:
    """A recipe by name or path (default: tiny; with `task=seq-cls` and no model, tiny-cls), flags applied."""
    if name_or_path is None and overrides.get("model") is None:
        name_or_path = TASK_DEFAULT_RECIPES.get(str(overrides.get("task") or "").strip())
    path = find_recipe(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise MuaError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise MuaError(f"recipe {path} cannot be read as a YAML text file ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise MuaError(f"recipe {path} must be a mapping of keys to values")
    flat = {"name": path.stem, **flatten(raw, str(path))}
    Recipe.of(str(path), **flat)  # the file's own errors name the file
    flags = {k: typed(k, v, flag=True) for k, v in overrides.items() if v is not None}
    return Recipe.of(str(path), **{**flat, **flags})


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    return Recipe.of(source, **flatten(raw, source))


def flatten(raw: dict, source: str) -> dict:
    """A file's mapping as flat keys: it may hold flat keys, or the sections model, data, optim and sweep (whose
    keys are the flat names, or the section's own: `model: {name: gpt2}`), or both."""
    flat = {}
    for k, v in raw.items():
        if k in ("optim", "sweep") or (k in ("model", "data") and isinstance(v, dict)):
            if not isinstance(v, dict):
                raise MuaError(f"{source}: {k} must be a mapping of keys to values, not {v!r}")
            inner = {_FIELD_KEYS[k].get(x, x): y for x, y in v.items()}
            stray = sorted(str(x) for x in inner if x not in KEYS or KEYS[x].section != k)
            if stray:
                raise MuaError(f"{source}: {k}: unknown key(s) {', '.join(stray)}")
            flat.update(inner)
        else:
            flat[k] = v
    return flat


def _plain(name: str) -> bool:
    """A name that stays one folder under runs/: no separator, not `.` or `..`, not empty."""
    return bool(name.strip()) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _norm(v: Any) -> str:
    return json.dumps(list(v) if isinstance(v, tuple) else v, sort_keys=True, default=str)


# a section's own name for a key whose flat name differs (model.name is `model`, data.source is `data`)
_FIELD_KEYS = {s: {k.field: k.key for k in KEYS.values() if k.section == s and k.field != k.key} for s in SECTIONS}
