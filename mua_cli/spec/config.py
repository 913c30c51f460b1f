"""A recipe's four sections, typed. Each field's metadata is the one place that says its YAML key, its type and
range, whether it changes a trial's outcome, and its `mua sweep` flag: validation, the trial's identity hash,
the CLI and the key table in docs/recipes.md are all read from it."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import MuaError
from ..science.theory import parse_lrs, parse_ranks, parse_regimes

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
TASKS = ("causal-lm", "seq-cls", "image-cls")


def knob(default: Any, what: str, *, key: str = "", check=None, flag: str = "", outcome: bool = True):
    """A recipe field. `what`: one line for the docs. `key`: its YAML name where that is not the field's.
    `check(name, value)`: what is wrong with the value, as one line, or None. `flag`: the help of its
    `mua sweep --KEY` option, if it has one. `outcome=False`: it only chooses which trials run."""
    meta = {"key": key, "what": what, "check": check, "flag": flag, "outcome": outcome}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# A check takes (key, value) and returns what is wrong, as one line, or None.
def _range(ok, want: str):
    return lambda key, v: None if ok(v) else f"{key} must be {want}, not {list(v) if isinstance(v, tuple) else v!r}"


def _between(least: int, most: int):
    def check(key, v):
        if v < least:
            return f"{key} must be at least {least}, not {v!r}"
        return f"{key} must be at most {most}, not {v!r}" if v > most else None

    return check


def _positive_finite(key, v):
    if not v > 0:  # NaN too
        return f"{key} must be positive, not {v!r}"
    return f"{key} must be finite, not {v!r}" if math.isinf(v) else None


# Past these a trial is useless or never ends: each is far beyond any sweep mua is for
MAX_STEPS, MAX_BATCH, MAX_SEEDS = 10**9, 10**6, 1000
MIN_STEPS = 2  # a schedule needs a first and a last step
LR_MIN, LR_MAX = 1e-12, 1e6  # the learning rates a trial store keeps (sweep/store.py's DISTRIBUTIONS)


def _lr_grid(key, v):
    lrs = parse_lrs(v)  # raises its own one-line MuaError naming what is wrong
    out = [lr for lr in lrs if not LR_MIN <= lr <= LR_MAX]
    if out:
        return f"{key}: learning rates must lie between {LR_MIN:g} and {LR_MAX:g}; {v!r} has {out[0]:.3g}"
    return None


def _one_of(*allowed):
    return lambda key, v: None if v in allowed else f"{key} must be {' or '.join(map(repr, allowed))}, not {v!r}"


def _parses(parse):
    def check(key, v):
        parse(v)  # raises its own one-line MuaError naming what is wrong

    return check


def _whole(v, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _model_config(key, cfg: dict):
    bad = [(k, v) for k, v in cfg.items() if k in SIZE_KEYS and not _whole(v, 1)]
    return f"{key}: {bad[0][0]} must be a positive whole number, not {bad[0][1]!r}" if bad else None


PRETRAIN_KEYS = ("batch_size", "data", "lr", "seed", "steps")


def _pretrain(key, p: dict):
    unknown = sorted(map(str, set(p) - set(PRETRAIN_KEYS)))
    if unknown:
        return f"{key}: unknown key(s) {', '.join(unknown)}; known: {', '.join(PRETRAIN_KEYS)}"
    for k in ("steps", "batch_size", "seed"):
        if not _whole(v := p.get(k, 1), 0 if k == "seed" else 1):
            return f"{key}: {k} must be a whole number{'' if k == 'seed' else ' of at least 1'}, not {v!r}"
    lr = p.get("lr", 1e-3)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
        return f"{key}: lr must be a positive number, not {lr!r}"
    if not isinstance(p.get("data", ""), str):
        return f"{key}: data must be text, e.g. embedded:shakespeare"
    return None


def _trackers(key, v) -> str | None:
    names = [n.strip().lower() for n in str(v).split(",") if n.strip()]
    bad = [n for n in names if n not in ("tensorboard", "mlflow", "wandb", "none")]
    return f"{key}: unknown tracker {bad[0]!r}; choose from tensorboard, mlflow, wandb" if bad else None


@dataclass(frozen=True)
class ModelSpec:
    """What is finetuned, and which of its modules get LoRA."""

    name: str = knob("embedded:tiny", "a Hugging Face hub name or a local folder (`save_pretrained`), or "
                     "`embedded:tiny` (causal LM) or `embedded:encoder` (seq-cls)", key="model",
                     flag="Hugging Face model: hub name or local folder.")  # fmt: skip
    task: str = knob("causal-lm", "`causal-lm`, `seq-cls` or `image-cls`", check=_one_of(*TASKS),
                     flag="causal-lm, seq-cls or image-cls.")  # fmt: skip
    config: dict = knob({}, "for `embedded:` models, the transformers config (sizes)", key="model_config",
                        check=_model_config)  # fmt: skip
    dtype: str = knob("float32", "frozen weights' dtype on a GPU: `float32` or `bfloat16`; on the CPU always "
                      "float32", check=_one_of("float32", "bfloat16"),
                      flag="Frozen weights' dtype on a GPU: float32 or bfloat16.")  # fmt: skip
    targets: list[str] | str = knob("all-linear", "LoRA target modules: `all-linear`, or names such as "
                                    "`q_proj,v_proj` (a list in YAML)",
                                    flag="LoRA targets, e.g. q_proj,v_proj (default all-linear).")  # fmt: skip
    pretrain: dict = knob({}, "for `embedded:` models, the cached pretraining: `data`, `steps`, `batch_size`, "
                          "`lr`, `seed`", check=_pretrain)  # fmt: skip

    @property
    def embedded(self) -> bool:
        return self.name.startswith("embedded:")


@dataclass(frozen=True)
class DataSpec:
    """What each trial trains on, and what it holds out."""

    source: str = knob("embedded:britannica", "see [Data](#data)", key="data",
                       flag="A .txt/.jsonl/.csv file, a dataset, an image folder.")  # fmt: skip
    text_field: str = knob("text", "the input field; `a,b` joins two fields (a text pair for `seq-cls`); the "
                           "image field for `image-cls`",
                           flag="The input field (a,b: a text pair; the image field for image-cls).")  # fmt: skip
    label_field: str = knob("label", "the class field of classification data (`labels` is tried when `label` "
                            "is missing)", flag="The class field of classification data.")  # fmt: skip
    seq_len: int = knob(64, "LM window length; maximum tokens per example for `seq-cls`",
                        check=_range(lambda v: v >= 2, "at least 2"),
                        flag="LM window length; most tokens per example for seq-cls.")  # fmt: skip
    eval_fraction: float = knob(0.1, "the share of records (or of a text's tail) held out",
                                check=_range(lambda v: 0 <= v < 1, "in [0, 1)"),
                                flag="The share of records held out, in [0, 1).")  # fmt: skip


@dataclass(frozen=True)
class Optim:
    """How each trial trains and is scored: the paper's AdamW, warmup 5 %, cosine to 0.1×, clip 1.0."""

    steps: int = knob(100, "training steps per trial", check=_between(MIN_STEPS, MAX_STEPS),
                      flag="Training steps per trial.")  # fmt: skip
    batch_size: int = knob(8, "sequences (or images) per step",
                           check=_between(1, MAX_BATCH),
                           flag="Sequences per step.")  # fmt: skip
    warmup_frac: float = knob(0.05, "linear warmup, as a share of the steps",
                              check=_range(lambda v: 0 <= v < 1, "in [0, 1)"),
                              flag="Linear warmup, as a share of the steps.")  # fmt: skip
    min_lr_ratio: float = knob(0.1, "where the cosine decay ends, as a share of the peak LR",
                               check=_range(lambda v: 0 < v <= 1, "in (0, 1]"),
                               flag="Where the cosine decay ends, as a share of the peak LR.")  # fmt: skip
    weight_decay: float = knob(
        0.01, "AdamW's weight decay", check=_range(lambda v: v >= 0, "0 or more"), flag="AdamW's weight decay."
    )
    betas: tuple[float, float] = knob((0.9, 0.999), "AdamW's β1, β2",
                                      check=_range(lambda v: all(0 <= b < 1 for b in v), "in [0, 1)"))  # fmt: skip
    eps: float = knob(1e-8, "AdamW's ε", check=_range(lambda v: v > 0, "positive"), flag="AdamW's ε.")
    grad_clip: float = knob(
        1.0, "the gradient norm's clip", check=_range(lambda v: v > 0, "positive"), flag="The gradient norm's clip."
    )
    alpha0: float = knob(1.0, "α0 in α = α0 · r^-γ", check=_positive_finite,
                         flag="α0 in α = α0 · r^-γ.")  # fmt: skip
    head_lr: float = knob(1e-3, "the fixed LR of a classifier's head (see below)",
                          check=_range(lambda v: v > 0, "positive"),
                          flag="The fixed LR of a classifier's head.")  # fmt: skip
    per_layer_lr: bool = knob(False, "fan-in scaling of each layer's LR (see below)",
                              flag="Scale each layer's LR by its fan-in.")  # fmt: skip
    metric: str = knob("train", "`train` (training loss over the last `metric_frac` of steps) or `eval` "
                       "(held-out loss)", check=_one_of("train", "eval"),
                       flag="Final metric: 'train' (last 10 % of steps) or 'eval'.")  # fmt: skip
    metric_frac: float = knob(0.1, "the share of the last steps whose training loss is the metric",
                              check=_range(lambda v: 0 < v <= 1, "in (0, 1]"),
                              flag="The share of the last steps whose training loss is the metric.")  # fmt: skip
    divergence_factor: float = knob(2.0, "a trial whose loss passes this × its first loss stops as diverged",
                                    check=_range(lambda v: v > 1, "above 1"),
                                    flag="A trial whose loss passes this × its first stops as diverged.")  # fmt: skip


@dataclass(frozen=True)
class SweepSpec:
    """Which trials run. None of it enters a trial's identity."""

    ranks: str = knob("4,16,64", "LoRA ranks; `full` adds full finetuning", check=_parses(parse_ranks),
                      outcome=False, flag="LoRA ranks, e.g. 4,16,64; add 'full' for full finetuning.")  # fmt: skip
    regimes: str = knob("A:r,B:1", "μA regimes `<init>:<scaling>` (`mua theory` lists them)",
                        check=_parses(parse_regimes), outcome=False,
                        flag="μA regimes <init>:<scaling>, e.g. A:r,B:1 (see `mua theory`).")  # fmt: skip
    lrs: str = knob("2^-12:2^-4", "the LR grid: a power-of-2 range `2^-12:2^-4` or a list `1e-3,2e-3`",
                    check=_lr_grid, outcome=False,
                    flag="LR grid: a power-of-2 range '2^-12:2^-4' or a list '1e-3,2e-3'.")  # fmt: skip
    seeds: int = knob(1, "seeds per grid point", check=_between(1, MAX_SEEDS),
                      outcome=False,
                      flag="Seeds per grid point.")  # fmt: skip
    max_extend: int = knob(4, "rounds of grid extension past an edge where an optimum sits", outcome=False,
                           check=_range(lambda v: v >= 0, "0 or more"),
                           flag="Rounds of grid extension past an edge where an optimum sits.")  # fmt: skip
    refine: int = knob(1, "`1`: run every other LR of a grid of 6 or more first, then only the grid's LRs the fit "
                       "reads around each optimum; once the grid settles, add half-octave LRs either side of each "
                       "interior optimum, then one more seed at the two LRs nearest each η* whose 95 % interval "
                       "is still wider than a factor 2; `0`: the whole grid, nothing added but extensions",
                       check=_one_of(0, 1), outcome=False,
                       flag="1: half the grid first, then fill and refine near optima; 0: the whole grid.")  # fmt: skip
    report_to: str = knob("", "experiment trackers that get each trial's loss curve, metric and hyperparameters: "
                          "`tensorboard`, `mlflow`, `wandb` (comma-separated; optional extras, docs/trackers.md)",
                          check=_trackers, outcome=False,
                          flag="Trackers for each trial's curve: tensorboard, mlflow, wandb.")  # fmt: skip


SECTIONS = {"model": ModelSpec, "data": DataSpec, "optim": Optim, "sweep": SweepSpec}


@dataclass(frozen=True)
class Key:
    """One YAML key: where it lives and what its field's metadata says."""

    key: str
    section: str
    field: str
    kind: Any  # the field's type
    default: Any
    meta: dict


def _keys() -> dict[str, Key]:
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            key = f.metadata["key"] or f.name
            out[key] = Key(key, section, f.name, hints[f.name], default, dict(f.metadata))
    return out


KEYS = _keys()  # every recipe key but name and description, in section order
OUTCOME_KEYS = tuple(k for k, spec in KEYS.items() if spec.meta["outcome"])


def typed(key: str, v: Any, source: str = "", flag: bool = False) -> Any:
    """`v` as its key's type, then checked against its range; one line naming the key, in `source` (a file, a
    study), when it does not fit. `flag`: the value came as `mua sweep --KEY`, which the line names instead."""
    spec = KEYS[key]
    name, where = (f"--{key.replace('_', '-')}", "") if flag else (key, f"{source}: ")

    def bad(want: str) -> MuaError:
        return MuaError(f"{where}{name} must be {want}, not {v!r}")

    if spec.section == "sweep" and spec.kind is str and not isinstance(v, bool):
        if isinstance(v, int | float):
            v = str(v)  # `ranks: 16` in YAML
        elif isinstance(v, list) and all(isinstance(x, int | float | str) for x in v):
            v = ",".join(map(str, v))  # `ranks: [4, 16]`
    v = _coerce(spec.kind, v, bad)
    wrong = spec.meta["check"](name, v) if spec.meta["check"] else None
    if wrong:
        raise MuaError(f"{where}{wrong}")
    return v


def _coerce(kind, v, bad):
    number = isinstance(v, int | float) and not isinstance(v, bool)
    if kind is int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise bad("a whole number")
        return int(v)
    if kind is float:
        if not number:
            raise bad("a number")
        return float(v)
    if kind is bool:
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if kind is str:
        if not isinstance(v, str):
            raise bad("text")
        return v
    if kind is dict:
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v):
            raise bad("a mapping of names to values")
        return v
    if kind == tuple[float, float]:
        if not (isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v)):
            raise bad("two numbers, e.g. [0.9, 0.999]")
        return tuple(float(x) for x in v)
    if kind == list[str] | str:
        if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
            return v
        raise bad("a module name or a list of names")
    raise AssertionError(f"no coercion for {kind}")


def keys_markdown() -> str:
    """docs/recipes.md's table of keys, rendered from the metadata above (a test keeps the doc current)."""

    def shown(v) -> str:
        if v in ({}, ""):
            return ""
        if isinstance(v, bool):
            return f"`{str(v).lower()}`"
        return f"`{list(v) if isinstance(v, tuple) else v}`"

    rows = ["| key | section | default | `mua sweep` flag | changes the outcome | what it is |", "|---" * 6 + "|"]
    for key, k in KEYS.items():
        dash = key.replace("_", "-")
        flag = (f"`--{dash}/--no-{dash}`" if k.kind is bool else f"`--{dash}`") if k.meta["flag"] else ""
        outcome = "yes" if k.meta["outcome"] else "no: which trials run"
        rows.append(f"| `{key}` | {k.section} | {shown(k.default)} | {flag} | {outcome} | {k.meta['what']} |")
    return "\n".join(rows) + "\n"
