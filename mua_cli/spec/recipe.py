"""Recipes: what to finetune, on what, for how long, and which sweep to run.

A recipe is a YAML file of flat keys (see `recipes/tiny.yaml`); command-line flags override it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import MuaError
from ..science.theory import FULL, parse_lrs, parse_ranks, parse_regimes

# An installed wheel ships the recipes inside the package; a checkout (and an editable install) keeps them in
# recipes/ beside it
_PACKAGED = Path(__file__).resolve().parent.parent / "recipes"
RECIPES_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "recipes"
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
DEFAULT_RECIPE = "tiny"


@dataclass
class Recipe:
    """Everything that decides a sweep's trials. Fields marked `sweep` only choose *which* trials run;
    the others change a trial's outcome and enter its identity hash."""

    name: str = "tiny"
    description: str = ""
    # model
    model: str = "embedded:tiny"  # "embedded:NAME", a Hugging Face hub name, or a local folder
    task: str = "causal-lm"  # causal-lm | seq-cls | image-cls
    model_config: dict = field(default_factory=dict)  # for embedded models: the transformers config
    dtype: str = "float32"  # weights' dtype: float32 | bfloat16
    targets: list[str] | str = "all-linear"  # LoRA target modules
    # data
    data: str = "embedded:britannica"
    text_field: str = "text"
    label_field: str = "label"
    seq_len: int = 64
    eval_fraction: float = 0.1
    # pretraining of embedded models (cached in the user cache folder)
    pretrain: dict = field(default_factory=dict)
    # optimization (docs/science.md's defaults: the paper's AdamW, warmup 5 %, cosine to 0.1×, clip 1.0)
    steps: int = 100
    batch_size: int = 8
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    alpha0: float = 1.0
    head_lr: float = 1e-3  # a new classification head is trained in full at this fixed LR
    per_layer_lr: bool = False
    # the final metric: "train" = training loss averaged over the last `metric_frac` of steps
    metric: str = "train"  # train | eval
    metric_frac: float = 0.1
    divergence_factor: float = 2.0  # a loss above this × the starting loss is divergence
    # sweep (which trials; not part of a trial's identity)
    ranks: str = "4,16,64"
    regimes: str = "A:r,B:1"
    lrs: str = "2^-12:2^-4"
    seeds: int = 1
    max_extend: int = 4  # rounds of grid extension per (regime, rank)
    # 1: once the grid settles, add half-octave LRs either side of each interior optimum, then one more seed near
    # each optimum whose interval is still wider than a factor 2; 0: off
    refine: int = 1

    SWEEP_FIELDS = ("name", "description", "ranks", "regimes", "lrs", "seeds", "max_extend", "refine")

    def validate(self) -> Recipe:
        parse_ranks(self.ranks)
        parse_regimes(self.regimes)
        parse_lrs(self.lrs)
        _check(self.steps >= 2, f"steps must be at least 2, not {self.steps}")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, not {self.batch_size}")
        _check(self.seq_len >= 2, f"seq_len must be at least 2, not {self.seq_len}")
        _check(self.seeds >= 1, f"seeds must be at least 1, not {self.seeds}")
        _check(self.refine in (0, 1), f"refine must be 0 or 1, not {self.refine!r}")
        _check(self.alpha0 > 0, f"alpha0 must be positive, not {self.alpha0}")
        _check(self.metric in ("train", "eval"), f"metric must be 'train' or 'eval', not {self.metric!r}")
        _check(self.task in ("causal-lm", "seq-cls", "image-cls"), f"unknown task {self.task!r}")
        _check(self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, not {self.dtype!r}")
        _check(0 < self.metric_frac <= 1, "metric_frac must be in (0, 1]")
        _check(0 <= self.warmup_frac < 1, "warmup_frac must be in [0, 1)")
        _check(self.divergence_factor > 1, "divergence_factor must be above 1")
        _check(all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), not {list(self.betas)}")
        _check(
            self.eps > 0 and self.weight_decay >= 0 and self.grad_clip > 0,
            "eps and grad_clip must be positive and weight_decay not negative",
        )
        _check(0 < self.min_lr_ratio <= 1, "min_lr_ratio must be in (0, 1]")
        _check(0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)")
        _check(self.head_lr > 0, f"head_lr must be positive, not {self.head_lr}")
        self._check_pretrain()
        for k, v in self.model_config.items():
            if k in SIZE_KEYS:
                _check(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                    f"model_config: {k} must be a positive whole number, not {v!r}",
                )
        return self

    def _check_pretrain(self) -> None:
        """The embedded model's pretraining: data (text), steps and batch_size (whole numbers ≥ 1), lr (> 0),
        seed (a whole number)."""
        known = {"data", "steps", "batch_size", "lr", "seed"}
        unknown = sorted(set(self.pretrain) - known)
        _check(
            not unknown, f"pretrain: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}"
        )
        for k in ("steps", "batch_size", "seed"):
            v = self.pretrain.get(k, 1)
            ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if k == "seed" else v >= 1)
            _check(ok, f"pretrain: {k} must be a whole number{'' if k == 'seed' else ' of at least 1'}, not {v!r}")
        lr = self.pretrain.get("lr", 1e-3)
        _check(isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0,
               f"pretrain: lr must be a positive number, not {lr!r}")  # fmt: skip
        _check(isinstance(self.pretrain.get("data", ""), str), "pretrain: data must be text, e.g. embedded:shakespeare")

    @property
    def rank_list(self) -> list[int | str]:
        return parse_ranks(self.ranks)

    @property
    def lora_ranks(self) -> list[int]:
        return [r for r in self.rank_list if r != FULL]

    @property
    def wants_full(self) -> bool:
        return FULL in self.rank_list

    def outcome_fields(self) -> dict:
        """The resolved fields that change a trial's outcome."""
        d = dataclasses.asdict(self)
        for k in self.SWEEP_FIELDS:
            d.pop(k, None)
        d["betas"] = list(d["betas"])
        return d

    def fingerprint(self) -> str:
        blob = json.dumps(self.outcome_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    def settings_text(self) -> str:
        b1, b2 = self.betas
        return (
            f"AdamW(β=({b1}, {b2}), ε={self.eps:g}, weight decay {self.weight_decay:g}), "
            f"clip {self.grad_clip:g}, warmup {self.warmup_frac:.0%} then cosine to {self.min_lr_ratio:g}× peak, "
            f"{self.steps} steps, batch {self.batch_size} × {self.seq_len}"
        )


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise MuaError(f"recipe: {msg}")


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
    path = find_recipe(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise MuaError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise MuaError(f"recipe {path} cannot be read as a YAML text file ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise MuaError(f"recipe {path} must be a mapping of keys to values")
    raw.setdefault("name", path.stem)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MuaError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    raw = dict(raw)
    for k in ("ranks", "regimes", "lrs"):
        if isinstance(raw.get(k), list):
            raw[k] = ",".join(str(x) for x in raw[k])
        elif isinstance(raw.get(k), int | float) and not isinstance(raw.get(k), bool):
            raw[k] = str(raw[k])  # `ranks: 16` in YAML
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    for k, v in raw.items():
        raw[k] = _typed(k, v, types[k], source)
    try:
        return Recipe(**raw).validate()
    except TypeError as e:
        raise MuaError(f"{source}: {e}") from None


def _typed(key: str, v, kind: str, source: str):
    """`v` checked against the field's annotation; one clear line naming the key when it does not fit."""

    def bad(want: str):
        return MuaError(f"{source}: {key} must be {want}, not {v!r}")

    number = isinstance(v, int | float) and not isinstance(v, bool)
    if kind == "int":
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise bad("a whole number")
        return int(v)
    if kind == "float":
        if not number:
            raise bad("a number")
        return float(v)
    if kind == "bool":
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if kind == "str":
        if not isinstance(v, str):
            raise bad("text")
        return v
    if kind == "dict":
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v):
            raise bad("a mapping of names to values")
        return v
    if kind.startswith("tuple[float, float]"):
        if not (isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v)):
            raise bad("two numbers, e.g. [0.9, 0.999]")
        return tuple(float(x) for x in v)
    if kind.startswith("list[str] | str"):
        if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
            return v
        raise bad("a module name or a list of names")
    return v
