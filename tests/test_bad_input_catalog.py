"""The catalog of bad inputs: every mistake tried on the command line, with the one line `mua` answers.

Each case runs `mua` in-process (typer's CliRunner) in a folder of its own, which is also the working directory,
and must end as a user's mistake does: exit code 2, exactly one line `error: …` on stderr holding the expected
words, no traceback, no password, and nothing left behind (the folder's files byte for byte as before, and no
new file or folder unless the case names it). A case that mua does not meet yet is kept and marked as a known
bug (a strict xfail), so that fixing mua turns it into a failure that asks for the mark to go.

docs/bad_inputs.md is made from this file: `MUA_WRITE_CATALOG=1 .venv/bin/python -m pytest
tests/test_bad_input_catalog.py` writes it from what each case printed, and `test_the_catalog_doc_is_current`
checks that it is current.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TEST_RECIPE
from typer.testing import CliRunner

from mua_cli.ui.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad_inputs.md"
SECRET = "secret"  # the password in the storage URLs below: never printed
PG_DOWN = f"postgresql+psycopg://mua:{SECRET}@127.0.0.1:1/mua"  # nothing listens on port 1
runner = CliRunner()


class TrialsStarted(Exception):
    """Raised where a sweep would start its trials: a bad input that got that far was not caught."""


# ------------------------------------------------------------------------------------------------ the cases


@dataclass
class Ctx:
    """A case's own folder (also the working directory), and the inputs it writes there."""

    tmp: Path
    world: World

    def write(self, name: str, content: str | bytes = "") -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return name

    def mkdir(self, name: str) -> str:
        (self.tmp / name).mkdir(parents=True, exist_ok=True)
        return name

    def recipe(self, **fields) -> str:
        """The micro test recipe (conftest.py) with `fields` changed, as r.yaml."""
        return self.write("r.yaml", yaml.safe_dump({**TINY_TEST_RECIPE, **fields}))

    def run(self, name: str = "run", damage: Callable[[bytearray], bytes] | None = None) -> str:
        """A copy of the module's swept run (fitted, so transfer reads its fit.json); `damage` rewrites trials.db."""
        shutil.copytree(self.world.run, self.tmp / name)
        if damage is not None:
            db = self.tmp / name / "trials.db"
            db.write_bytes(bytes(damage(bytearray(db.read_bytes()))))
        return name

    def store(self, name: str, content: bytes) -> str:
        """A run folder whose trials.db holds `content`."""
        self.write(f"{name}/trials.db", content)
        return name

    def sqlite(self, name: str, *statements: str) -> str:
        """A run folder whose trials.db is an SQLite database made by `statements`."""
        self.mkdir(name)
        con = sqlite3.connect(self.tmp / name / "trials.db")
        for s in statements:
            con.execute(s)
        con.commit()
        con.close()
        return name

    def optuna_store(self, name: str, studies: tuple[str, ...] = ()) -> str:
        """A run folder with an Optuna store that holds `studies` and no trial; mua's own study when none given."""
        import optuna

        from mua_cli.sweep.store import TrialStore

        self.mkdir(name)
        if not studies:
            TrialStore.create(self.tmp / name)  # created, never written: a sweep killed before its first trial
        for s in studies:
            optuna.create_study(storage=f"sqlite:///{self.tmp / name / 'trials.db'}", study_name=s)
        return name

    def run_with_recipe_yaml(self, content: str | bytes | None) -> str:
        """A copy of the run whose recipe.yaml holds `content`; None: removed."""
        self.run()
        if content is None:
            (self.tmp / "run" / "recipe.yaml").unlink()
            return "run"
        self.write("run/recipe.yaml", content)
        return "run"

    def malicious_model(self, name: str = "evil") -> str:
        """A model folder (the RoBERTa shape below) whose pytorch_model.bin is a pickle that would run a command."""
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("touch pwned",))

        self.cls_model(name)
        self.write(f"{name}/pytorch_model.bin", pickle.dumps(Evil()))
        return name

    def cls_model(self, name: str = "model") -> str:
        """A RoBERTa-shaped folder with config.json and a tokenizer (no weights): enough for seq-cls data checks."""
        shutil.copytree(self.world.cls_model, self.tmp / name)
        return name


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    what: str  # the bad input, in words (markdown)
    argv: Callable[[Ctx], list]
    expect: str  # words the one error line must hold
    bug: str = ""  # a known bug in mua: the case fails (strict xfail) until it is fixed
    gpus: int | None = None  # simulate this many visible CUDA GPUs
    leaves: tuple[str, ...] = ()  # paths (relative to the case's folder) the command may leave behind
    env: tuple[tuple[str, str], ...] = ()  # environment variables the command runs under


def sweep(*args) -> Callable[[Ctx], list]:
    """`mua sweep ARGS`, into a new run folder `out` on the CPU unless ARGS name them."""

    def argv(c: Ctx) -> list:
        got = [a(c) if callable(a) else a for a in args]
        out = [] if "--out" in got else ["--out", "out"]
        device = [] if "--device" in got else ["--device", "cpu"]
        return ["sweep", *got, *out, *device]

    return argv


def cmd(*args) -> Callable[[Ctx], list]:
    """Any other command; an argument may be a function of the case's folder (to write an input first)."""
    return lambda c: [a(c) if callable(a) else a for a in args]


def recipe_case(id: str, category: str, fields: dict, expect: str, bug: str = "") -> Case:
    shown = yaml.safe_dump(fields, default_flow_style=True, width=1000).strip()[1:-1]
    return Case(id, category, f"recipe with `{shown}`", sweep("--recipe", lambda c: c.recipe(**fields)), expect, bug)


def recipe_text(id: str, what: str, text: str | bytes, expect: str) -> Case:
    return Case(id, RFILE, what, sweep("--recipe", lambda c: c.write("r.yaml", text)), expect)


def data_case(id: str, what: str, name: str, content, expect: str, *more, bug: str = "") -> Case:
    """`mua sweep --data NAME` (the default tiny recipe) where NAME holds `content`; None: a folder; ...: nothing."""

    def data(c: Ctx) -> str:
        if content is None:
            return c.mkdir(name)
        return name if content is ... else c.write(name, content)

    return Case(id, DATA, what, sweep("--data", data, *more), expect, bug)


def cls_case(id: str, what: str, name: str, content, expect: str, task: str = "seq-cls") -> Case:
    more = ("--model", lambda c: c.cls_model(), "--task", task, "--ranks", "2")
    return data_case(id, what, name, content, expect, *more)


def _overwrite_a_page_header(b: bytearray) -> bytes:
    ps = int.from_bytes(b[16:18], "big")
    start = (len(b) // ps // 2) * ps  # a page in the middle of the file, from its header on
    b[start : start + 100] = b"\xff" * 100
    return b


def _garble_a_trial(b: bytearray) -> bytes:
    """One trial's stored JSON made unparseable: SQLite's pages stay whole, so only reading the trials shows it."""
    b[b.find(b'"ok"')] = ord("#")
    return b


def _half(b: bytearray) -> bytes:
    return b[: len(b) // 2]


GARBAGE = b"this is not a database\n" * 200
CUSTOM_CODE_CONFIG = (
    '{"model_type": "llama", "auto_map": {"AutoConfig": "configuration_x.XConfig", '
    '"AutoModelForCausalLM": "modeling_x.XForCausalLM"}, "hidden_size": 32, "intermediate_size": 64, '
    '"num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 260}'
)
TYPER = "typer's usage panel (several lines, no `error:` line) instead of one line naming the option"
AS_MARKUP = "the message is printed as Rich markup"
CORRUPTED = "trials.db is corrupted or not an SQLite database"
UNREACHABLE = "the database cannot be reached"
NO_TRIALS = "has no finished trials yet"
BAD_TASK = "task must be 'causal-lm' or 'seq-cls' or 'image-cls', not 'translation'"

RANKS = "Ranks"
REGIMES = "Regimes"
GRIDS = "LR grids"
NUMBERS = "Steps and other numbers"
DEVICES = "Devices"
PATHS = "Paths"
RFILE = "Recipe files"
RTYPE = "Recipe field types"
RVALUE = "Recipe field values"
RMODEL = "Recipe model and pretraining"
DATA = "Data files"
RUNS = "Run folders"
TRANSFER = "Transfer options"
STORAGE = "Storage URLs"
CLI = "Command line"
MARKUP = "Inputs that look like Rich markup"
CASES: list[Case] = [
    # ---------------------------------------------------------------------------------------------- ranks
    Case("ranks-zero", RANKS, "rank 0", sweep("--ranks", "0"), "bad rank 0 in '0': ranks must be at least 1"),
    Case("ranks-negative", RANKS, "a negative rank", sweep("--ranks", "-4"), "ranks must be at least 1"),
    Case("ranks-word", RANKS, "a word", sweep("--ranks", "abc"), "ranks are positive integers or 'full'"),
    Case("ranks-fraction", RANKS, "a fraction", sweep("--ranks", "1.5"), "bad rank '1.5'"),
    Case("ranks-one-bad", RANKS, "one bad rank among good ones", sweep("--ranks", "4,x,16"), "bad rank 'x'"),
    Case("ranks-empty", RANKS, "nothing", sweep("--ranks", ""), "no rank in ''"),
    Case("ranks-commas", RANKS, "commas alone", sweep("--ranks", ",,"), "no rank in ',,'"),
    Case("ranks-huge", RANKS, "a rank no layer has", sweep("--ranks", "99999999"), "no layer is that wide"),
    Case(
        "full-check-with-full",
        RANKS,
        "`--full-check` on a sweep that measures full finetuning itself",
        sweep("--ranks", "4,full", "--full-check"),
        "--full-check is for sweeps without full finetuning",
    ),
    Case(
        "full-check-with-study",
        RANKS,
        "`--full-check` with a shared study",
        sweep("--full-check", "--storage", "sqlite:///s.db", "--study", "s"),
        "--full-check runs in a local run folder",
    ),
    Case(
        "ranks-above-the-model",
        RANKS,
        "a rank above the tiny model's width (128)",
        sweep("--ranks", "4,200"),
        "rank 200 is larger than the model's adapted layers allow: at most 128",
    ),
    # -------------------------------------------------------------------------------------------- regimes
    Case("regimes-unknown", REGIMES, "an unknown regime", sweep("--regimes", "C:9"), "unknown regime 'C:9'"),
    Case("regimes-no-scaling", REGIMES, "an init without its scaling", sweep("--regimes", "A"), "unknown regime 'A'"),
    Case("regimes-lowercase", REGIMES, "lower case", sweep("--regimes", "a:r"), "unknown regime 'a:r'"),
    Case("regimes-one-bad", REGIMES, "one bad among good", sweep("--regimes", "A:r,B:2"), "unknown regime 'B:2'"),
    Case("regimes-empty", REGIMES, "commas alone", sweep("--regimes", ","), "no regime given"),
    Case("regimes-blank", REGIMES, "a blank", sweep("--regimes", " "), "no regime given"),
    # ---------------------------------------------------------------------------------------------- grids
    Case("lrs-word", GRIDS, "a word", sweep("--lrs", "abc"), "bad learning-rate grid 'abc'"),
    Case("lrs-negative", GRIDS, "a negative LR", sweep("--lrs", "-1e-3,1e-3,2e-3"), "must be positive"),
    Case("lrs-zero", GRIDS, "LR 0", sweep("--lrs", "0,1e-3,2e-3"), "learning rates must be positive"),
    Case("lrs-infinite", GRIDS, "an infinite LR", sweep("--lrs", "inf,1,2"), "learning rates must be positive"),
    Case("lrs-nan", GRIDS, "NaN", sweep("--lrs", "nan,1e-3,2e-3"), "learning rates must be positive"),
    Case("lrs-one-point", GRIDS, "one LR", sweep("--lrs", "1e-3"), "has 1 point(s); a sweep needs at least 3"),
    Case("lrs-two-points", GRIDS, "a range of 2 points", sweep("--lrs", "2^-4:2^-3"), "has 2 point(s)"),
    Case("lrs-reversed-short", GRIDS, "a reversed range of 2 points", sweep("--lrs", "2^-3:2^-4"), "2 point(s)"),
    Case("lrs-repeated", GRIDS, "one LR three times", sweep("--lrs", "1e-3,1e-3,1e-3"), "has 1 point(s)"),
    Case("lrs-empty", GRIDS, "nothing", sweep("--lrs", ""), "learning-rate grid '' has 0 point(s)"),
    Case("lrs-open-range", GRIDS, "a range without its end", sweep("--lrs", "2^-4:"), "bad learning-rate grid"),
    Case("lrs-overflow", GRIDS, "2^99999", sweep("--lrs", "2^-4:2^99999"), "bad learning-rate grid"),
    Case("lrs-three-ends", GRIDS, "a range of three ends", sweep("--lrs", "2^-4:2^-5:2^-6"), "use '2^-12:2^-6'"),
    Case("lrs-semicolons", GRIDS, "semicolons", sweep("--lrs", "1e-3;2e-3;4e-3"), "bad learning-rate grid"),
    # -------------------------------------------------------------------------------------- steps and numbers
    Case("steps-zero", NUMBERS, "0 steps", sweep("--steps", "0"), "--steps must be at least 2, not 0"),
    Case("steps-one", NUMBERS, "1 step", sweep("--steps", "1"), "steps must be at least 2, not 1"),
    Case("steps-negative", NUMBERS, "-5 steps", sweep("--steps", "-5"), "at least 2, not -5"),
    Case("steps-word", NUMBERS, "a word", sweep("--steps", "abc"), "--steps"),
    Case("batch-zero", NUMBERS, "batch 0", sweep("--batch-size", "0"), "--batch-size must be at least 1, not 0"),
    Case("batch-negative", NUMBERS, "batch -8", sweep("--batch-size", "-8"), "not -8"),
    Case("batch-word", NUMBERS, "a word", sweep("--batch-size", "x"), "--batch-size"),
    Case("seeds-zero", NUMBERS, "0 seeds", sweep("--seeds", "0"), "seeds must be at least 1, not 0"),
    Case("seeds-fraction", NUMBERS, "1.5 seeds", sweep("--seeds", "1.5"), "--seeds"),
    Case("alpha0-zero", NUMBERS, "α0 = 0", sweep("--alpha0", "0"), "alpha0 must be positive"),
    Case("alpha0-negative", NUMBERS, "α0 < 0", sweep("--alpha0", "-1"), "alpha0 must be positive"),
    Case("alpha0-nan", NUMBERS, "α0 NaN", sweep("--alpha0", "nan"), "alpha0 must be positive"),
    Case("alpha0-word", NUMBERS, "a word", sweep("--alpha0", "one"), "--alpha0"),
    Case("metric-unknown", NUMBERS, "an unknown metric", sweep("--metric", "loss"), "not 'loss'"),
    Case("task-unknown", NUMBERS, "an unknown task", sweep("--task", "translation"), BAD_TASK),
    Case(
        "workers-negative",
        NUMBERS,
        "-1 slots per GPU",
        sweep("--workers-per-gpu", "-1"),
        "--workers-per-gpu",
    ),
    Case("batch-trials-word", NUMBERS, "a word", sweep("--batch-trials", "x"), "--batch-trials"),
    # -------------------------------------------------------------------------------------------- devices
    Case("device-unknown", DEVICES, "an unknown device", sweep("--device", "tpu"), "unknown device 'tpu'"),
    Case("device-empty", DEVICES, "nothing", sweep("--device", ""), "unknown device ''"),
    Case(
        "device-cuda-without-gpu",
        DEVICES,
        "`cuda` on a machine without a GPU",
        sweep("--device", "cuda"),
        "--device cuda asked for, but no CUDA GPU is visible",
        gpus=0,
    ),
    Case(
        "device-cuda0-without-gpu",
        DEVICES,
        "`cuda:0` on a machine without a GPU",
        sweep("--device", "cuda:0"),
        "no CUDA GPU is visible",
        gpus=0,
    ),
    Case(
        "device-cuda9",
        DEVICES,
        "`cuda:9` on a machine with one GPU",
        sweep("--device", "cuda:9"),
        "--device cuda:9: this machine has GPUs cuda:0 … cuda:0",
        gpus=1,
    ),
    Case(
        "device-cuda-x",
        DEVICES,
        "`cuda:x` on a machine with one GPU",
        sweep("--device", "cuda:x"),
        "--device cuda:x: this machine has GPUs",
        gpus=1,
    ),
    Case(
        "device-cuda-minus-one",
        DEVICES,
        "`cuda:-1` on a machine with one GPU",
        sweep("--device", "cuda:-1"),
        "--device cuda:-1: this machine has GPUs",
        gpus=1,
    ),
    Case(
        "worker-device-unknown",
        DEVICES,
        "`mua worker` on an unknown device",
        cmd("worker", "--study", "mua", "--out", lambda c: c.run(), "--device", "tpu"),
        "unknown device 'tpu'",
    ),
    # ---------------------------------------------------------------------------------------------- paths
    Case("out-a-file", PATHS, "`--out` names a file", sweep("--out", lambda c: c.write("a-file", "x")), "is a file"),
    Case(
        "out-under-a-file",
        PATHS,
        "`--out` under a file",
        sweep("--out", lambda c: c.write("a-file", "x") + "/run"),
        "cannot create the run folder a-file/run: Not a directory",
    ),
    Case(
        "out-read-only",
        PATHS,
        "`--out` where no folder can be made (/proc)",
        sweep("--out", "/proc/mua-run"),
        "cannot create the run folder /proc/mua-run",
    ),
    Case(
        "out-other-settings",
        PATHS,
        "`--out` a run swept with other settings",
        sweep("--recipe", lambda c: c.recipe(), "--out", lambda c: c.run(), "--steps", "7"),
        "run was swept with other settings",
    ),
    Case("recipe-no-such-name", PATHS, "an unknown recipe name", sweep("--recipe", "nosuch"), "no recipe named"),
    Case(
        "recipe-missing-file",
        PATHS,
        "a recipe file that does not exist",
        sweep("--recipe", "no/such/recipe.yaml"),
        "recipe file no/such/recipe.yaml does not exist",
    ),
    Case(
        "recipe-a-folder",
        PATHS,
        "a recipe path that is a folder",
        sweep("--recipe", lambda c: c.mkdir("folder.yaml")),
        "recipe file folder.yaml",
    ),
    Case(
        "recipe-a-folder-no-suffix",
        PATHS,
        "a recipe name that is a folder here",
        sweep("--recipe", lambda c: c.mkdir("tiny")),
        "recipe file tiny",
    ),
    Case(
        "model-missing-folder",
        PATHS,
        "a local model folder that does not exist",
        sweep("--model", "./no-model"),
        "model ./no-model does not exist",
    ),
    Case("model-missing-deep", PATHS, "a deep path", sweep("--model", "no/such/model"), "model no/such/model does not"),
    Case(
        "model-a-file",
        PATHS,
        "a model path that is a file",
        sweep("--model", lambda c: c.write("weights.bin", "x")),
        "model weights.bin is a file; give the folder that holds config.json",
    ),
    Case(
        "model-no-config",
        PATHS,
        "a model folder without config.json",
        sweep("--model", lambda c: c.mkdir("model")),
        "model folder model holds no config.json",
    ),
    Case(
        "model-no-tokenizer",
        PATHS,
        "a model folder without a tokenizer",
        sweep("--model", lambda c: c.write("model/config.json", "{}") and "model"),
        "model folder model holds no tokenizer",
    ),
    Case(
        "model-no-weights",
        PATHS,
        "a model folder without weights",
        sweep(
            "--model",
            lambda c: c.cls_model(),
            "--task",
            "seq-cls",
            "--ranks",
            "2",
            "--data",
            lambda c: c.write("two.csv", "text,label\nthe river,0\nthe king,1\nold stone,0\nnew road,1\n"),
        ),
        "cannot load model 'model' for seq-cls: Error no file named model.safetensors",
    ),
    Case(
        "model-embedded-unknown",
        PATHS,
        "an unknown embedded model",
        sweep("--model", "embedded:nope"),
        "no embedded model 'embedded:nope'",
    ),
    Case(
        "task-embedded-seq-cls",
        PATHS,
        "a classification task on the embedded causal LM",
        sweep("--model", "embedded:tiny", "--task", "seq-cls"),
        "the embedded model embedded:tiny is a causal LM, not a classifier",
    ),
    # --------------------------------------------------------------------------------------- recipe files
    recipe_text("yaml-unclosed", "an unclosed list", "steps: [unclosed\n", "is not valid YAML"),
    recipe_text("yaml-tab", "a tab as indentation", "\tsteps: 3\n", "is not valid YAML"),
    recipe_text("yaml-bad-indent", "a key indented under a value", "steps: 10\n  batch_size: 3\n", "not valid YAML"),
    recipe_text("yaml-binary", "binary bytes", bytes(range(256)) * 4, "cannot be read as a YAML text file"),
    recipe_text("yaml-list", "a list, not a mapping", "- steps\n- 10\n", "must be a mapping of keys to values"),
    recipe_text("yaml-number", "a number, not a mapping", "42\n", "must be a mapping of keys to values"),
    recipe_text("yaml-text", "a sentence, not a mapping", "just some text\n", "must be a mapping of keys to values"),
    recipe_case("key-unknown", RFILE, {"stepz": 3}, "r.yaml: unknown key(s) stepz; known keys: alpha0"),
    recipe_case("keys-unknown", RFILE, {"learning_rate": 1, "epochs": 2}, "unknown key(s) epochs, learning"),
    # -------------------------------------------------------------------------------------- recipe types
    recipe_case("int-word", RTYPE, {"steps": "ten"}, "steps must be a whole number, not 'ten'"),
    recipe_case("int-fraction", RTYPE, {"steps": 10.5}, "steps must be a whole number, not 10.5"),
    recipe_case("int-bool", RTYPE, {"steps": True}, "steps must be a whole number, not True"),
    recipe_case("int-quoted", RTYPE, {"batch_size": "8"}, "batch_size must be a whole number"),
    recipe_case("int-null", RTYPE, {"seq_len": None}, "seq_len must be a whole number, not None"),
    recipe_case("int-list", RTYPE, {"seeds": [1]}, "seeds must be a whole number, not [1]"),
    recipe_case("int-max-extend", RTYPE, {"max_extend": "x"}, "max_extend must be a whole number"),
    recipe_case("float-word", RTYPE, {"alpha0": "one"}, "alpha0 must be a number, not 'one'"),
    recipe_case("float-bool", RTYPE, {"eps": True}, "eps must be a number, not True"),
    recipe_case("float-percent", RTYPE, {"warmup_frac": "5%"}, "warmup_frac must be a number"),
    recipe_case("float-null", RTYPE, {"head_lr": None}, "head_lr must be a number, not None"),
    recipe_case("bool-word", RTYPE, {"per_layer_lr": "yes"}, "per_layer_lr must be true or false"),
    recipe_case("bool-one", RTYPE, {"per_layer_lr": 1}, "per_layer_lr must be true or false, not 1"),
    recipe_case("str-number", RTYPE, {"metric": 5}, "metric must be text, not 5"),
    recipe_case("str-list", RTYPE, {"task": ["seq-cls"]}, "task must be text, not ['seq-cls']"),
    recipe_case("str-model-number", RTYPE, {"model": 3}, "model must be text, not 3"),
    recipe_case("str-data-null", RTYPE, {"data": None}, "data must be text, not None"),
    recipe_case("str-name-number", RTYPE, {"name": 7}, "name must be text, not 7"),
    recipe_case("str-mapping", RTYPE, {"text_field": {"a": 1}}, "text_field must be text"),
    recipe_case("dict-number", RTYPE, {"model_config": 5}, "model_config must be a mapping"),
    recipe_case("dict-list", RTYPE, {"pretrain": [1, 2]}, "pretrain must be a mapping of names"),
    recipe_case("dict-number-keys", RTYPE, {"model_config": {1: 2}}, "model_config must be a mapping"),
    recipe_case("betas-number", RTYPE, {"betas": 0.9}, "betas must be two numbers, e.g. [0.9, 0.999]"),
    recipe_case("betas-one", RTYPE, {"betas": [0.9]}, "betas must be two numbers"),
    recipe_case("betas-word", RTYPE, {"betas": [0.9, "x"]}, "betas must be two numbers"),
    recipe_case("betas-three", RTYPE, {"betas": [0.9, 0.99, 0.999]}, "betas must be two numbers"),
    recipe_case("targets-numbers", RTYPE, {"targets": [1, 2]}, "targets must be a module name or"),
    recipe_case("targets-empty", RTYPE, {"targets": []}, "targets must be a module name or a list"),
    recipe_case("targets-number", RTYPE, {"targets": 5}, "targets must be a module name or a list"),
    recipe_case("ranks-in-recipe", RTYPE, {"ranks": [2, "x"]}, "bad rank 'x' in '2,x'"),
    recipe_case("regimes-number", RTYPE, {"regimes": 5}, "unknown regime '5'"),
    recipe_case("lrs-one-in-list", RTYPE, {"lrs": [0.1]}, "learning-rate grid '0.1' has 1 point(s)"),
    # ------------------------------------------------------------------------------------- recipe ranges
    recipe_case("steps-below-2", RVALUE, {"steps": 1}, "r.yaml: steps must be at least 2, not 1"),
    recipe_case("batch-below-1", RVALUE, {"batch_size": 0}, "batch_size must be at least 1, not 0"),
    recipe_case("seq-len-below-2", RVALUE, {"seq_len": 1}, "seq_len must be at least 2, not 1"),
    recipe_case("seeds-below-1", RVALUE, {"seeds": 0}, "seeds must be at least 1, not 0"),
    recipe_case("refine-2", RVALUE, {"refine": 2}, "refine must be 0 or 1, not 2"),
    recipe_case("alpha0-zero-recipe", RVALUE, {"alpha0": 0}, "alpha0 must be positive, not 0.0"),
    recipe_case("metric-unknown-recipe", RVALUE, {"metric": "loss"}, "metric must be 'train' or"),
    recipe_case("task-unknown-recipe", RVALUE, {"task": "translation"}, BAD_TASK),
    recipe_case("dtype-float16", RVALUE, {"dtype": "float16"}, "dtype must be 'float32' or 'bfloat16', not 'float16'"),
    recipe_case("metric-frac-zero", RVALUE, {"metric_frac": 0}, "metric_frac must be in (0, 1]"),
    recipe_case("metric-frac-above-1", RVALUE, {"metric_frac": 1.5}, "metric_frac must be in (0, 1]"),
    recipe_case("warmup-one", RVALUE, {"warmup_frac": 1}, "warmup_frac must be in [0, 1)"),
    recipe_case("warmup-negative", RVALUE, {"warmup_frac": -0.1}, "warmup_frac must be in [0, 1)"),
    recipe_case("divergence-one", RVALUE, {"divergence_factor": 1}, "divergence_factor must be above"),
    recipe_case("beta-one", RVALUE, {"betas": [0.9, 1.0]}, "betas must be in [0, 1), not [0.9, 1.0]"),
    recipe_case("beta-negative", RVALUE, {"betas": [-0.1, 0.9]}, "betas must be in [0, 1), not [-0.1, 0.9]"),
    recipe_case("eps-zero", RVALUE, {"eps": 0}, "eps must be positive, not 0.0"),
    recipe_case("weight-decay-negative", RVALUE, {"weight_decay": -1}, "weight_decay must be 0 or more, not -1.0"),
    recipe_case("grad-clip-zero", RVALUE, {"grad_clip": 0}, "grad_clip must be positive, not 0.0"),
    recipe_case("min-lr-ratio-zero", RVALUE, {"min_lr_ratio": 0}, "min_lr_ratio must be in (0, 1]"),
    recipe_case("min-lr-ratio-2", RVALUE, {"min_lr_ratio": 2}, "min_lr_ratio must be in (0, 1]"),
    recipe_case("eval-fraction-one", RVALUE, {"eval_fraction": 1}, "eval_fraction must be in [0, 1)"),
    recipe_case("eval-fraction-neg", RVALUE, {"eval_fraction": -0.5}, "eval_fraction must be in"),
    recipe_case("head-lr-zero", RVALUE, {"head_lr": 0}, "head_lr must be positive, not 0.0"),
    recipe_case(
        "hidden-size-negative",
        RVALUE,
        {"model_config": {**TINY_TEST_RECIPE["model_config"], "hidden_size": -1}},
        "model_config: hidden_size must be a positive whole number, not -1",
    ),
    recipe_case(
        "layers-word",
        RVALUE,
        {"model_config": {**TINY_TEST_RECIPE["model_config"], "num_hidden_layers": "two"}},
        "num_hidden_layers must be a positive whole number, not 'two'",
    ),
    recipe_case(
        "heads-bool",
        RVALUE,
        {"model_config": {**TINY_TEST_RECIPE["model_config"], "num_attention_heads": True}},
        "num_attention_heads must be a positive whole number, not True",
    ),
    recipe_case("ranks-zero-recipe", RVALUE, {"ranks": 0}, "bad rank 0 in '0'"),
    recipe_case("regimes-unknown-recipe", RVALUE, {"regimes": "C:9"}, "unknown regime 'C:9'"),
    recipe_case("lrs-short-recipe", RVALUE, {"lrs": "2^-4:2^-3"}, "has 2 point(s)"),
    # ---------------------------------------------------------------------------- recipe model and pretraining
    recipe_case(
        "odd-head-dim",
        RMODEL,
        {"model_config": {**TINY_TEST_RECIPE["model_config"], "hidden_size": 30}},
        "hidden_size",
    ),
    recipe_case(
        "heads-not-dividing",
        RMODEL,
        {"model_config": {**TINY_TEST_RECIPE["model_config"], "num_attention_heads": 3}},
        "num_attention_heads",
    ),
    recipe_case(
        "pretrain-steps-word",
        RMODEL,
        {"pretrain": {"steps": "x"}},
        "pretrain",
    ),
    recipe_case(
        "pretrain-steps-zero",
        RMODEL,
        {"pretrain": {"steps": 0}},
        "pretrain",
    ),
    recipe_case(
        "pretrain-lr-word",
        RMODEL,
        {"pretrain": {"lr": "fast"}},
        "pretrain",
    ),
    recipe_case("pretrain-data-unknown", RMODEL, {"pretrain": {"data": "embedded:nope"}}, "no embedded corpus 'nope'"),
    recipe_case(
        "targets-no-such-layer",
        RMODEL,
        {"targets": "nosuch_proj"},
        "LoRA targets 'nosuch_proj' match no linear layer of the model",
    ),
    recipe_case("data-blank", RMODEL, {"data": ""}, "no dataset given"),
    recipe_case("data-embedded-blank", RMODEL, {"data": "embedded:"}, "no embedded corpus ''"),
    # ----------------------------------------------------------------------------------------- data files
    data_case("data-missing", "a file that does not exist", "missing.txt", ..., "data missing.txt does not exist"),
    data_case("data-missing-deep", "a path that does not exist", "no/such.txt", ..., "data no/such.txt does not"),
    data_case("data-empty-txt", "an empty text file", "empty.txt", "", "dataset empty.txt is empty"),
    data_case("data-blank-txt", "a text file of blanks", "blank.txt", "  \n\n \n", "dataset blank.txt is empty"),
    data_case("data-tiny-txt", "a text too small for one window", "small.txt", "hi there", "is too small: 8"),
    data_case("data-binary-txt", "a binary .txt", "bin.txt", bytes(range(256)) * 8, "bin.txt is not UTF-8 text"),
    data_case("data-binary-jsonl", "a binary .jsonl", "bin.jsonl", bytes(range(256)) * 8, "is not UTF-8 text"),
    data_case("data-binary-csv", "a binary .csv", "bin.csv", bytes(range(256)) * 8, "bin.csv is not UTF-8 text"),
    data_case("data-unknown-suffix", "an unknown suffix", "data.xyz", "hello", "unknown type '.xyz'"),
    data_case("data-empty-jsonl", "an empty .jsonl", "empty.jsonl", "", "dataset empty.jsonl is empty"),
    data_case("data-empty-csv", "an empty .csv", "empty.csv", "", "dataset empty.csv is empty"),
    data_case(
        "data-jsonl-no-text",
        "JSONL records without the text field",
        "notext.jsonl",
        '{"body": "a line"}\n' * 50,
        "dataset notext.jsonl has no text field 'text'; its fields: body",
    ),
    data_case(
        "data-jsonl-blank-texts",
        "JSONL records whose texts are blank",
        "blank.jsonl",
        '{"text": "  "}\n' * 5,
        "every 'text' is blank",
    ),
    data_case(
        "data-jsonl-bad-line",
        "JSONL with a line that is not JSON",
        "bad.jsonl",
        '{"text": "a"}\n{oops\n',
        "data file bad.jsonl, line 2: not valid JSON",
    ),
    data_case(
        "data-jsonl-not-objects", "JSONL of lists", "lists.jsonl", "[1, 2]\n", "every record must be a JSON object"
    ),
    data_case("data-json-cut", "a .json cut short", "cut.json", '{"text": ', "cut.json, line 1: not valid JSON"),
    data_case(
        "data-tsv-no-text",
        "a .tsv without the text field",
        "table.tsv",
        "a\tb\n1\t2\n",
        "dataset table.tsv has no text field 'text'; its fields: a, b",
    ),
    data_case(
        "data-parquet-garbage",
        "a .parquet that is not Parquet",
        "bad.parquet",
        b"PAR1 garbage",
        "cannot read data file bad.parquet: Parquet magic bytes not found",
    ),
    data_case("data-empty-folder", "an empty folder", "folder", None, "is neither a saved dataset"),
    Case(
        "data-image-folder-no-images",
        DATA,
        "an image folder whose class folder holds no image",
        sweep("--data", lambda c: c.mkdir("imgs/cat") and "imgs"),
        "image folder imgs holds no images in its class subfolders (cat)",
    ),
    data_case("data-embedded-unknown", "an unknown embedded corpus", "embedded:nope", ..., "no embedded corpus"),
    cls_case(
        "cls-no-label",
        "seq-cls: a CSV without the label field",
        "nolabel.csv",
        "text,stars\nthe river,1\nthe king,0\n",
        "dataset nolabel.csv has no label field 'label'; its fields: text, stars",
    ),
    cls_case(
        "cls-no-text",
        "seq-cls: a CSV without the text field",
        "notext.csv",
        "body,label\nthe river,1\nthe king,0\n",
        "dataset notext.csv has no text field 'text'; its fields: body, label",
    ),
    cls_case(
        "cls-one-class",
        "seq-cls: one class only",
        "one.csv",
        "text,label\nthe river,1\nthe king,1\n",
        "classification needs at least 2 classes; the data has 1",
    ),
    cls_case(
        "cls-some-unlabelled",
        "seq-cls: JSONL records without a label",
        "some.jsonl",
        '{"text": "the river", "label": 1}\n{"text": "the king"}\n',
        "dataset some.jsonl: some records have no 'label'",
    ),
    cls_case("cls-header-only", "seq-cls: a CSV header alone", "header.csv", "text,label\n", "header.csv is empty"),
    cls_case(
        "cls-plain-text",
        "seq-cls: plain text",
        "embedded:britannica",
        ...,
        "task seq-cls needs records with inputs and labels",
    ),
    cls_case(
        "image-cls-no-image",
        "image-cls: a CSV without an image field",
        "notext.csv",
        "body,label\nthe river,1\nthe king,0\n",
        "dataset notext.csv has no image field",
        task="image-cls",
    ),
    # ------------------------------------------------------------------------------------------ run folders
    Case("fit-missing", RUNS, "a run folder that does not exist", cmd("fit", "no-run"), "no-run does not"),
    Case(
        "fit-a-file",
        RUNS,
        "a run folder that is a file",
        cmd("fit", lambda c: c.write("a-file", "x")),
        "run folder a-file",
    ),
    Case(
        "fit-empty-folder",
        RUNS,
        "an empty folder",
        cmd("fit", lambda c: c.mkdir("empty")),
        "empty holds no trial store (trials.db); run `mua sweep --out empty`",
    ),
    Case(
        "fit-store-a-folder",
        RUNS,
        "trials.db is a folder",
        cmd("fit", lambda c: c.mkdir("run/trials.db") and "run"),
        "run holds no trial store (trials.db)",
    ),
    Case(
        "fit-store-zero-bytes",
        RUNS,
        "an empty trials.db (0 bytes)",
        cmd("fit", lambda c: c.store("run", b"")),
        f"run {NO_TRIALS}",
    ),
    Case(
        "fit-store-no-trials",
        RUNS,
        "a store made but never written",
        cmd("fit", lambda c: c.optuna_store("run")),
        f"run {NO_TRIALS}",
    ),
    Case(
        "fit-store-other-studies",
        RUNS,
        "an Optuna store holding two studies of other names",
        cmd("fit", lambda c: c.optuna_store("run", ("a", "b"))),
        f"run {NO_TRIALS}",
    ),
    Case(
        "fit-store-truncated-half",
        RUNS,
        "trials.db truncated to half",
        cmd("fit", lambda c: c.run(damage=_half)),
        f"{CORRUPTED} (database disk image is malformed); it was left untouched",
    ),
    Case(
        "fit-store-truncated-mid-page",
        RUNS,
        "trials.db truncated mid-page",
        cmd("fit", lambda c: c.run(damage=lambda b: b[: len(b) // 2 + 1234])),
        CORRUPTED,
    ),
    Case(
        "fit-store-header-only",
        RUNS,
        "trials.db cut after its first 100 bytes",
        cmd("fit", lambda c: c.run(damage=lambda b: b[:100])),
        CORRUPTED,
    ),
    Case(
        "fit-store-garbage",
        RUNS,
        "trials.db of text, not SQLite",
        cmd("fit", lambda c: c.store("run", GARBAGE)),
        f"{CORRUPTED} (no SQLite header)",
    ),
    Case(
        "fit-store-page-overwritten",
        RUNS,
        "trials.db with a page header overwritten",
        cmd("fit", lambda c: c.run(damage=_overwrite_a_page_header)),
        CORRUPTED,
    ),
    Case(
        "fit-store-trial-garbled",
        RUNS,
        "trials.db whose pages are whole but one trial's JSON is garbled",
        cmd("fit", lambda c: c.run(damage=_garble_a_trial)),
        f"{CORRUPTED} (a trial's data does not parse",
    ),
    Case(
        "fit-store-foreign",
        RUNS,
        "trials.db of another program (SQLite)",
        cmd("fit", lambda c: c.sqlite("run", "create table notes(x)", "insert into notes values (1)")),
        "trials.db is an SQLite database but not a trial store",
    ),
    Case(
        "transfer-store-truncated",
        RUNS,
        "`transfer` on a truncated trials.db",
        cmd("transfer", lambda c: c.run(damage=_half)),
        CORRUPTED,
    ),
    Case(
        "transfer-store-garbage",
        RUNS,
        "`transfer` on a trials.db of text",
        cmd("transfer", lambda c: c.store("run", GARBAGE), "--to", "16"),
        CORRUPTED,
    ),
    Case(
        "transfer-store-foreign",
        RUNS,
        "`transfer` on another program's SQLite file",
        cmd("transfer", lambda c: c.sqlite("run", "create table notes(x)")),
        "is an SQLite database but not a trial store",
    ),
    Case(
        "transfer-empty-folder",
        RUNS,
        "`transfer` on an empty folder",
        cmd("transfer", lambda c: c.mkdir("empty")),
        "empty holds no trial store",
    ),
    Case(
        "sweep-into-garbage",
        RUNS,
        "`sweep` resuming into a trials.db of text",
        sweep("--out", lambda c: c.store("run", GARBAGE)),
        f"{CORRUPTED} (no SQLite header)",
    ),
    Case(
        "sweep-into-truncated",
        RUNS,
        "`sweep` resuming into a truncated trials.db",
        sweep("--recipe", lambda c: c.recipe(), "--out", lambda c: c.run(damage=_half)),
        CORRUPTED,
    ),
    Case(
        "sweep-into-foreign",
        RUNS,
        "`sweep` into another program's SQLite file",
        sweep("--out", lambda c: c.sqlite("run", "create table notes(x)", "insert into notes values (1)")),
        "is an SQLite database but not a trial store",
    ),
    Case(
        "sweep-into-foreign-studies-table",
        RUNS,
        "`sweep` into an SQLite file with an unrelated `studies` table",
        sweep("--out", lambda c: c.sqlite("run", "create table studies(x)")),
        "trials.db is an SQLite database but not a trial store",
    ),
    Case(
        "fit-bare-no-runs",
        RUNS,
        "a bare `mua fit` where there is no runs/",
        cmd("fit"),
        "no run folder with trials under runs/",
    ),
    Case(
        "transfer-bare-empty-runs",
        RUNS,
        "a bare `mua transfer` where runs/ holds only an empty folder",
        cmd("transfer", lambda c: c.mkdir("runs/killed") and "--quiet"),
        "no run folder with trials under runs/",
    ),
    Case(
        "fit-study-no-storage",
        RUNS,
        "`fit --study` without `--storage`, no such run folder",
        cmd("fit", "--study", "s"),
        "runs/s holds no trial store (trials.db)",
    ),
    # ------------------------------------------------------------------------------------- transfer options
    Case("to-zero", TRANSFER, "rank 0", cmd("transfer", lambda c: c.run(), "--to", "0"), "not 0"),
    Case("to-negative", TRANSFER, "rank -3", cmd("transfer", lambda c: c.run(), "--to", "-3"), "not -3"),
    Case("to-word", TRANSFER, "a word", cmd("transfer", lambda c: c.run(), "--to", "abc"), "not 'abc'"),
    Case("to-fraction", TRANSFER, "2.5", cmd("transfer", lambda c: c.run(), "--to", "2.5"), "not '2.5'"),
    Case("to-float", TRANSFER, "1e40", cmd("transfer", lambda c: c.run(), "--to", "1e40"), "not '1e40'"),
    Case("to-empty", TRANSFER, "nothing", cmd("transfer", lambda c: c.run(), "--to", ""), "not ''"),
    Case(
        "to-huge",
        TRANSFER,
        "a rank of 24 digits",
        cmd("transfer", lambda c: c.run(), "--to", "1" + "0" * 23),
        "--to takes a rank from 1 to 16777216",
    ),
    Case(
        "to-above-the-model",
        TRANSFER,
        "a rank above the swept model's width (32)",
        cmd("transfer", lambda c: c.run(), "--to", "1000"),
        "rank 1000 is larger than the model's adapted layers allow: at most 32",
    ),
    Case(
        "to-no-value",
        TRANSFER,
        "`--to` without its value",
        cmd("transfer", lambda c: c.run(), "--to"),
        "--to",
    ),
    Case(
        "basis-unknown",
        TRANSFER,
        "an unknown basis",
        cmd("transfer", lambda c: c.run(), "--basis", "bogus"),
        "unknown --basis 'bogus'; choose from auto",
    ),
    Case(
        "basis-rank-for-full-ft",
        TRANSFER,
        "a rank basis for full finetuning",
        cmd("transfer", lambda c: c.run(), "--basis", "shrunk-slope"),
        "basis 'shrunk-slope' does not apply to --to full-ft",
    ),
    Case(
        "basis-full-ft-for-rank",
        TRANSFER,
        "a full-finetuning basis for a rank",
        cmd("transfer", lambda c: c.run(), "--to", "16", "--basis", "study-offset"),
        "basis 'study-offset' does not apply to a rank target",
    ),
    Case(
        "basis-calibrated-alone",
        TRANSFER,
        "`calibrated` without `--calibrate`",
        cmd("transfer", lambda c: c.run(), "--basis", "calibrated"),
        "basis 'calibrated' needs --calibrate RUN",
    ),
    Case(
        "basis-measured-unswept",
        TRANSFER,
        "`measured` at a rank not swept",
        cmd("transfer", lambda c: c.run(), "--to", "16", "--basis", "measured"),
        "this run measured no interior optimum for B:1 at rank 16",
    ),
    Case(
        "regime-unknown",
        TRANSFER,
        "an unknown regime",
        cmd("transfer", lambda c: c.run(), "--to", "16", "--regime", "bogus"),
        "unknown regime 'bogus'",
    ),
    Case(
        "regime-unswept",
        TRANSFER,
        "a regime the run did not sweep",
        cmd("transfer", lambda c: c.run(), "--to", "16", "--regime", "A:r"),
        "no trials for regime A:r in this run; sweep it with --regimes A:r",
    ),
    Case(
        "regime-unknown-full-ft",
        TRANSFER,
        "an unknown regime with `--to full-ft`",
        cmd("transfer", lambda c: c.run(), "--to", "full-ft", "--regime", "bogus"),
        "unknown regime 'bogus'",
    ),
    Case(
        "calibrate-missing",
        TRANSFER,
        "`--calibrate` a folder that does not exist",
        cmd("transfer", lambda c: c.run(), "--calibrate", "no-proxy"),
        "run folder no-proxy does not exist",
    ),
    Case(
        "calibrate-a-file",
        TRANSFER,
        "`--calibrate` a file",
        cmd("transfer", lambda c: c.run(), "--calibrate", lambda c: c.write("a-file", "x")),
        "run folder a-file",
    ),
    Case(
        "calibrate-empty-folder",
        TRANSFER,
        "`--calibrate` an empty folder",
        cmd("transfer", lambda c: c.run(), "--calibrate", lambda c: c.mkdir("proxy")),
        "proxy holds no trial store",
    ),
    Case(
        "calibrate-corrupted",
        TRANSFER,
        "`--calibrate` a run whose store is text",
        cmd("transfer", lambda c: c.run(), "--calibrate", lambda c: c.store("proxy", GARBAGE)),
        f"run folder proxy: its trial store {CORRUPTED}",
    ),
    Case(
        "calibrate-rank-target",
        TRANSFER,
        "`--calibrate` with a rank target",
        cmd("transfer", lambda c: c.run(), "--to", "16", "--calibrate", lambda c: c.run("proxy")),
        "--calibrate applies to --to full-ft only",
    ),
    # -------------------------------------------------------------------------------------------- storage
    Case(
        "sweep-storage-nonsense",
        STORAGE,
        "a URL that is no URL",
        sweep("--storage", "nonsense"),
        "cannot write the trial store nonsense: Could not parse SQLAlchemy URL",
    ),
    Case(
        "sweep-storage-unknown-scheme",
        STORAGE,
        "an unknown scheme",
        sweep("--storage", "foo://x"),
        "cannot write the trial store foo://x: Can't load plugin: sqlalchemy.dialects:foo",
    ),
    Case(
        "sweep-storage-pg8000",
        STORAGE,
        "a PostgreSQL driver that is not installed",
        sweep("--storage", "postgresql+pg8000://u:pw@127.0.0.1:1/db"),
        "storage postgresql+pg8000://u:***@127.0.0.1:1/db: the PostgreSQL driver 'pg8000' is not installed",
    ),
    Case(
        "sweep-storage-mysql",
        STORAGE,
        "a MySQL URL (no driver)",
        sweep("--storage", f"mysql://u:{SECRET}@127.0.0.1:1/db"),
        "cannot open the trial store mysql://u:***@127.0.0.1:1/db: No module named 'MySQLdb'",
    ),
    Case(
        "sweep-storage-unreachable",
        STORAGE,
        "a PostgreSQL server that cannot be reached (the password is `secret`)",
        sweep("--storage", PG_DOWN),
        f"postgresql+psycopg://mua:***@127.0.0.1:1/mua: {UNREACHABLE}",
    ),
    Case(
        "sweep-storage-unreachable-bare-scheme",
        STORAGE,
        "`postgresql://` (psycopg taken) that cannot be reached",
        sweep("--storage", f"postgresql://mua:{SECRET}@127.0.0.1:1/mua"),
        UNREACHABLE,
    ),
    Case(
        "sweep-study-unreachable",
        STORAGE,
        "a shared study on a server that cannot be reached",
        sweep("--storage", PG_DOWN, "--study", "big"),
        UNREACHABLE,
    ),
    Case(
        "sweep-storage-sqlite-no-folder",
        STORAGE,
        "an SQLite URL in a folder that does not exist",
        sweep("--storage", "sqlite:////nonexistent/dir/x.db"),
        "cannot write the trial store sqlite:////nonexistent/dir/x.db: unable to open database file",
    ),
    Case(
        "fit-storage-nonsense",
        STORAGE,
        "`fit` with a URL that is no URL",
        cmd("fit", "--storage", "nonsense", "--study", "s"),
        "cannot read the trial store nonsense",
    ),
    Case(
        "fit-storage-unknown-scheme",
        STORAGE,
        "`fit` with an unknown scheme",
        cmd("fit", "--storage", "foo://x", "--study", "s"),
        "Can't load plugin: sqlalchemy.dialects:foo",
    ),
    Case(
        "fit-storage-pg8000",
        STORAGE,
        "`fit` with a driver that is not installed",
        cmd("fit", "--storage", "postgresql+pg8000://u:pw@127.0.0.1:1/db", "--study", "s"),
        "the PostgreSQL driver 'pg8000' is not installed",
    ),
    Case(
        "fit-storage-unreachable",
        STORAGE,
        "`fit` from a server that cannot be reached",
        cmd("fit", "--storage", PG_DOWN, "--study", "s"),
        UNREACHABLE,
    ),
    Case(
        "transfer-storage-unreachable",
        STORAGE,
        "`transfer` from a server that cannot be reached",
        cmd("transfer", "--storage", PG_DOWN, "--study", "s"),
        UNREACHABLE,
    ),
    Case(
        "worker-storage-nonsense",
        STORAGE,
        "`worker` with a URL that is no URL",
        cmd("worker", "--storage", "nonsense", "--study", "s", "--device", "cpu"),
        "cannot read the trial store nonsense",
    ),
    Case(
        "worker-storage-unknown-scheme",
        STORAGE,
        "`worker` with an unknown scheme",
        cmd("worker", "--storage", "foo://x", "--study", "s", "--device", "cpu"),
        "Can't load plugin: sqlalchemy.dialects:foo",
    ),
    Case(
        "worker-storage-pg8000",
        STORAGE,
        "`worker` with a driver that is not installed",
        cmd("worker", "--storage", "postgresql+pg8000://u:pw@127.0.0.1:1/db", "--study", "s", "--device", "cpu"),
        "the PostgreSQL driver 'pg8000' is not installed",
    ),
    Case(
        "worker-storage-unreachable",
        STORAGE,
        "`worker` on a server that cannot be reached",
        cmd("worker", "--storage", PG_DOWN, "--study", "s", "--device", "cpu"),
        UNREACHABLE,
    ),
    Case(
        "worker-no-storage-no-out",
        STORAGE,
        "`worker` with neither `--storage` nor `--out`",
        cmd("worker", "--study", "s", "--device", "cpu"),
        "mua worker needs --storage URL, or --out RUN",
    ),
    Case(
        "worker-no-such-study",
        STORAGE,
        "`worker --out RUN` for a study that RUN does not hold",
        cmd("worker", "--out", lambda c: c.run(), "--study", "nope", "--device", "cpu"),
        "no study 'nope' in sqlite:///<tmp>/run/trials.db; studies there: run (`mua sweep --study NAME` plans one)",
    ),
    Case(
        "worker-no-such-study-url",
        STORAGE,
        "`worker --storage sqlite:///…` for a study the file does not hold",
        cmd("worker", "--storage", lambda c: f"sqlite:///{c.run()}/trials.db", "--study", "nope", "--device", "cpu"),
        "no study 'nope' in sqlite:///run/trials.db",
    ),
    Case(
        "worker-out-missing",
        STORAGE,
        "`worker --out` a folder that does not exist",
        cmd("worker", "--out", "no-run", "--study", "s", "--device", "cpu"),
        "no-run holds no trial store",
    ),
    # ----------------------------------------------------------------------------------- the command line
    Case("option-unknown", CLI, "an option that does not exist", cmd("sweep", "--rank", "4"), "--rank"),
    Case("argument-extra", CLI, "an extra argument", cmd("sweep", "extra"), "extra"),
    Case("fit-two-runs", CLI, "two run folders", cmd("fit", "run1", "run2"), "run2"),
    Case("option-no-value", CLI, "an option without its value", cmd("sweep", "--recipe"), "--recipe"),
    Case(
        "flag-with-value",
        CLI,
        "a value given to an on/off flag",
        cmd("sweep", "--per-layer-lr=maybe"),
        "--per-layer-lr",
    ),
    Case("worker-no-study", CLI, "`worker` without `--study`", cmd("worker", "--out", "run"), "--study"),
    Case(
        "worker-wait-negative",
        CLI,
        "`worker --wait -1`",
        cmd("worker", "--study", "s", "--out", "run", "--wait", "-1"),
        "--wait",
    ),
    Case("command-unknown", CLI, "a command that does not exist", cmd("swep"), "swep"),
    # ------------------------------------------------------------------------------- text that looks like markup
    Case(
        "markup-closing-tag",
        MARKUP,
        "a rank written `[/foo]`",
        sweep("--ranks", "[/foo]"),
        "bad rank '[/foo]'",
    ),
    Case(
        "markup-recipe-path",
        MARKUP,
        "a recipe path holding `[/x]`",
        sweep("--recipe", "[/x].yaml"),
        "recipe file [/x].yaml does not exist",
    ),
    Case(
        "markup-run-path",
        MARKUP,
        "a run folder named `old[/run]`",
        cmd("fit", "old[/run]"),
        "run folder old[/run] does not exist",
    ),
    Case(
        "markup-style-tag",
        MARKUP,
        "a rank written `[bold]x`",
        sweep("--ranks", "[bold]x"),
        "bad rank '[bold]x'",
    ),
    Case(
        "markup-emoji-code",
        MARKUP,
        "a rank written `:x:`",
        sweep("--ranks", ":x:"),
        "bad rank ':x:'",
    ),
    Case(
        "markup-data-path",
        MARKUP,
        "a data file named `[red]notes.txt` that does not exist",
        sweep("--data", "[red]notes.txt"),
        "data [red]notes.txt does not exist",
    ),
    # ------------------------------------------------------------- found by a hostile probe (issue #29)
    Case(
        "steps-huge",
        NUMBERS,
        "10^20 steps",
        sweep("--steps", "100000000000000000000"),
        "--steps must be at most 1000000000, not 100000000000000000000",
    ),
    recipe_case("steps-huge-recipe", NUMBERS, {"steps": 10**20}, "steps must be at most 1000000000"),
    Case(
        "batch-huge",
        NUMBERS,
        "a batch of 10^9",
        sweep("--batch-size", "1000000000"),
        "--batch-size must be at most 1000000, not 1000000000",
    ),
    Case(
        "seeds-huge",
        NUMBERS,
        "10^8 seeds",
        sweep("--seeds", "100000000"),
        "--seeds must be at most 1000, not 100000000",
    ),
    Case(
        "alpha0-inf",
        NUMBERS,
        "α0 = ∞ (NaN was refused already)",
        sweep("--alpha0", "inf"),
        "alpha0 must be finite, not inf",
    ),
    Case("alpha0-minus-inf", NUMBERS, "α0 = −∞", sweep("--alpha0", "-inf"), "alpha0 must be positive"),
    recipe_case("alpha0-inf-recipe", NUMBERS, {"alpha0": float("inf")}, "alpha0 must be finite"),
    recipe_case(
        "eval-without-held-out",
        NUMBERS,
        {"metric": "eval", "eval_fraction": 0},
        "metric: eval scores held-out data, but eval_fraction is 0",
    ),
    Case(
        "eval-flag-without-held-out",
        NUMBERS,
        "`--metric eval` on a recipe that holds nothing out",
        sweep("--recipe", lambda c: c.recipe(eval_fraction=0), "--metric", "eval"),
        "eval_fraction is 0",
    ),
    Case(
        "lrs-below-storable",
        GRIDS,
        "LRs below what a trial store keeps (2^-45)",
        sweep("--lrs", "2^-45:2^-42"),
        "learning rates must lie between 1e-12 and 1e+06",
    ),
    Case(
        "lrs-above-storable",
        GRIDS,
        "LRs above what a trial store keeps (2^20)",
        sweep("--lrs", "2^20:2^22"),
        "learning rates must lie between 1e-12 and 1e+06",
    ),
    Case(
        "lrs-list-tiny",
        GRIDS,
        "a list with one LR of 1e-13",
        sweep("--lrs", "1e-13,1e-3,1e-2"),
        "learning rates must lie between 1e-12 and 1e+06",
    ),
    recipe_case(
        "model-config-typo",
        RMODEL,
        {"model_config": {**TINY_TEST_RECIPE["model_config"], "num_hiden_layers": 1}},
        "model_config: unknown key 'num_hiden_layers' (did you mean 'num_hidden_layers'?)",
    ),
    recipe_case(
        "model-config-unknown",
        RMODEL,
        {"model_config": {"flux_capacitor": 3}},
        "model_config: unknown key 'flux_capacitor'",
    ),
    Case(
        "model-custom-code",
        RMODEL,
        "a model folder whose config.json asks for its own code (`auto_map`)",
        sweep("--model", lambda c: (c.write("custom/config.json", CUSTOM_CODE_CONFIG), "custom")[1], "--ranks", "2"),
        "runs code of its own",
    ),
    Case(
        "model-malicious-bin",
        RMODEL,
        "a `pytorch_model.bin` whose pickle would run a command",
        sweep("--model", lambda c: c.malicious_model(), "--ranks", "2"),
        "cannot be loaded safely",
    ),
    Case(
        "out-empty",
        PATHS,
        "`--out ''` (it swept into the current folder)",
        sweep("--out", ""),
        "--out must name a folder",
    ),
    Case("out-name-too-long", PATHS, "a 300-character `--out`", sweep("--out", "x" * 300), "File name too long"),
    Case("out-blank", PATHS, "`--out ' '`", sweep("--out", " "), "--out must name a folder"),
    Case(
        "data-newline",
        PATHS,
        "a path with a newline in it",
        sweep("--data", "notes\nmore.txt"),
        "data notes\\nmore.txt does not exist",
    ),
    Case("study-empty", STORAGE, "`--study ''` (it became `mua`)", sweep("--study", ""), "--study must name a study"),
    Case(
        "worker-study-empty",
        STORAGE,
        "`mua worker --study ''`",
        cmd("worker", "--study", "", "--out", "run"),
        "--study must name a study",
    ),
    Case(
        "storage-sqlite-memory",
        STORAGE,
        "`--storage sqlite://` (in memory: every trial lost at exit)",
        sweep("--storage", "sqlite://"),
        "keeps nothing once the command ends",
    ),
    Case(
        "storage-sqlite-memory-named",
        STORAGE,
        "`--storage sqlite:///:memory:`",
        sweep("--storage", "sqlite:///:memory:"),
        "keeps nothing once the command ends",
    ),
    Case(
        "fit-storage-memory",
        STORAGE,
        "`mua fit --storage sqlite://`",
        cmd("fit", "--storage", "sqlite://"),
        "keeps nothing once the command ends",
    ),
    Case(
        "fit-env-storage-named-run",
        STORAGE,
        "an exported `MUA_STORAGE` (unreachable) and `mua fit X` of a folder without trials (it blamed the URL)",
        cmd("fit", lambda c: c.mkdir("empty-run")),
        "holds no trial store (trials.db)",
        env=(("MUA_STORAGE", PG_DOWN),),
    ),
    recipe_case("recipe-name-parent", RVALUE, {"name": "../../x"}, "name must be a plain name"),
    recipe_case("recipe-name-slash", RVALUE, {"name": "a/b"}, "name must be a plain name"),
    recipe_case("recipe-name-empty", RVALUE, {"name": ""}, "name must be a plain name"),
    data_case(
        "data-csv-row-longer",
        "a CSV row with more fields than its header",
        "d.csv",
        "text\nhello,extra\n",
        "d.csv: row 2 has more fields than its header",
    ),
    data_case(
        "data-jsonl-deep",
        "a JSONL line nested 100,000 deep",
        "d.jsonl",
        '{"text": ' + "[" * 100000 + "]" * 100000 + "}\n",
        "d.jsonl: line 1 is nested too deeply",
    ),
    data_case(
        "data-json-deep",
        "a `.json` file nested 100,000 deep",
        "d.json",
        "[" * 100000 + "]" * 100000,
        "d.json: nested too deeply",
    ),
    Case(
        "data-dev-null",
        DATA,
        "`--data /dev/null`",
        sweep("--data", "/dev/null"),
        "data /dev/null is not a file or a folder",
    ),
    Case(
        "run-recipe-yaml-list",
        RUNS,
        "a run folder whose recipe.yaml is a list",
        sweep("--recipe", lambda c: c.recipe(), "--out", lambda c: c.run_with_recipe_yaml("- a\n- b\n")),
        "was swept with other settings",
    ),
    Case(
        "run-recipe-yaml-binary",
        RUNS,
        "a run folder whose recipe.yaml is binary",
        sweep("--recipe", lambda c: c.recipe(), "--out", lambda c: c.run_with_recipe_yaml(b"\xff\xfe\x00\x81")),
        "was swept with other settings",
    ),
    Case(
        "run-recipe-yaml-missing",
        RUNS,
        "other settings (`steps: 12`, the run's 20) into a run folder whose recipe.yaml is gone (it rewrote it)",
        sweep("--recipe", lambda c: c.recipe(), "--out", lambda c: c.run_with_recipe_yaml(None)),
        "was swept with other settings (steps 20 → 12",
    ),
    Case(
        "fit-recipe-yaml-binary",
        RUNS,
        "`mua fit` of a run whose recipe.yaml is binary and trials.db garbage",
        cmd("fit", lambda c: c.store("bad", GARBAGE) and c.write("bad/recipe.yaml", b"\xff\xfe") and "bad"),
        CORRUPTED,
    ),
]
CATEGORIES = list(dict.fromkeys(c.category for c in CASES))


# ------------------------------------------------------------------------------------------ running a case


@dataclass
class Outcome:
    command: str  # as typed, the case's folder shown as <tmp>
    exit_code: int
    stdout: str
    stderr: str
    crash: str  # "Type: message" of an exception that escaped, else ""
    added: list[str] = field(default_factory=list)  # paths left behind that the case does not allow
    changed: list[str] = field(default_factory=list)  # paths changed or removed

    def printed(self) -> str:
        """What mua printed on stderr, on one line (the doc's column); a crash or an exit 0 said in words."""
        text = " ".join(re.sub(r"[╭╮╰╯│─]", " ", self.stderr).split())
        if self.crash.startswith(TrialsStarted.__name__):
            return "(no error: the sweep got past every check and started its trials; the test stopped it there)"
        if self.crash:
            return f"(exit {self.exit_code}, a traceback) {self.crash}"
        if self.exit_code == 0:
            return "(exit 0: no error; the command answered)" + (f" {text}" if text else "")
        return text


SEEN: dict[str, Outcome] = {}


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _play(case: Case, world: World, tmp: Path, mp: pytest.MonkeyPatch) -> Outcome:
    """Run the case in `tmp` (its working directory) and record what came out."""

    def trials_started(*args, **kwargs):
        raise TrialsStarted("the sweep went past every check and started its trials")

    mp.chdir(tmp)
    mp.delenv("MUA_STORAGE", raising=False)  # the run folder's own store unless a case names a URL
    for name, value in case.env:
        mp.setenv(name, value)
    mp.setattr("mua_cli.sweep.stream.Sweep.stream", trials_started)
    if case.gpus is not None:
        import torch

        mp.setattr(torch.cuda, "is_available", lambda: case.gpus > 0)
        mp.setattr(torch.cuda, "device_count", lambda: case.gpus)
    argv = [str(a) for a in case.argv(Ctx(tmp, world))]
    before = _tree(tmp)
    res = runner.invoke(app, argv)
    after = _tree(tmp)
    crash = ""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        crash = f"{type(res.exception).__name__}: {(str(res.exception).strip().splitlines() or [''])[0]}"
    out = Outcome(
        command=_normal(" ".join(["mua", *(a if a and " " not in a else repr(a) for a in argv)]), tmp),
        exit_code=res.exit_code,
        stdout=_normal(res.stdout, tmp),
        stderr=_normal(res.stderr, tmp),
        crash=_normal(crash, tmp),
        added=[p for p in after if p not in before and p not in case.leaves],
        changed=[p for p in before if after.get(p, b"gone") != before[p]],
    )
    SEEN[case.id] = out
    return out


def _normal(text: str, tmp: Path) -> str:
    """The doc must read the same on every clone: temporary folders and the checkout's own path are named."""
    for t in sorted({str(tmp.resolve()), str(tmp)}, key=len, reverse=True):
        text = text.replace(t, "<tmp>")
    return text.replace(f"{ROOT}{os.sep}", "<checkout>/")


def _check(case: Case, out: Outcome) -> None:
    """One `error:` line with the expected words, exit 2, no traceback, no password, nothing left behind."""
    assert not out.crash, f"a traceback: {out.crash}"
    assert out.exit_code == 2, f"exit code {out.exit_code}: {out.stderr or out.stdout}"
    assert SECRET not in out.stdout + out.stderr, "the password is printed"
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one `error:` line on stderr:\n{out.stderr}"
    assert case.expect in lines[0], f"{case.expect!r} is not in {lines[0]!r}"
    assert "Traceback" not in out.stdout + out.stderr
    # stdout: nothing, or the note a sweep prints before it starts (its run folder, device and settings)
    assert not out.stdout or out.stdout.startswith("• run folder "), out.stdout
    assert "error" not in out.stdout.lower(), out.stdout
    assert not out.added, f"left behind: {out.added}"
    assert not out.changed, f"changed or removed: {out.changed}"


# -------------------------------------------------------------------------------------------- the fixtures


@dataclass
class World:
    run: Path  # a small real sweep (B:1 at ranks 2 and 8, and full finetuning), fitted
    cls_model: Path  # a RoBERTa-shaped model folder: config.json and a tokenizer, no weights


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_cache) -> World:
    """Built once for the module: ~10 s, most of it pretraining the micro model into the session's cache."""
    import tiny_hf
    from transformers import RobertaConfig

    root = tmp_path_factory.mktemp("catalog-world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUA_CACHE", str(model_cache))
        mp.delenv("MUA_STORAGE", raising=False)
        recipe = root / "micro.yaml"
        raw = {**TINY_TEST_RECIPE, "steps": 20, "lrs": "2^-12:2^-6", "max_extend": 1, "refine": 0}
        recipe.write_text(yaml.safe_dump(raw))
        run = root / "run"
        res = runner.invoke(
            app, ["sweep", "--recipe", str(recipe), "--ranks", "2,8,full", "--regimes", "B:1", "--device", "cpu",
                  "--quiet", "--out", str(run)],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["fit", str(run), "--no-plot"])  # fit.json newer than the store: transfer reads it
        assert res.exit_code == 0, res.output
    model = root / "cls-model"
    RobertaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(model)
    tiny_hf.tokenizer(model)
    return World(run=run, cls_model=model)


def _param(case: Case):
    marks = pytest.mark.xfail(strict=True, reason=f"BUG: {case.bug}") if case.bug else ()
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, world, tmp_path, monkeypatch):
    _check(case, _play(case, world, tmp_path, monkeypatch))


def test_the_catalog_is_large_and_its_ids_unique():
    assert len({c.id for c in CASES}) == len(CASES) >= 110 + 35  # 35 of them from issue #29's probe
    assert {"Ranks", "Regimes", "LR grids", "Recipe files", "Data files", "Run folders", "Storage URLs"} <= set(
        CATEGORIES
    )


# ------------------------------------------------------------------------------------------------- the doc


def _cell(text: str) -> str:
    """Text as a markdown table cell's code span."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render(seen: dict[str, Outcome]) -> str:
    bugs = [c for c in CASES if c.bug]
    lines = [
        "# Bad inputs: every one tried, and what `mua` says",
        "",
        "<!-- Generated by tests/test_bad_input_catalog.py: do not edit by hand. -->",
        "",
        f"This catalog holds **{len(CASES)} bad inputs** in {len(CATEGORIES)} categories. It is made by "
        "`tests/test_bad_input_catalog.py` from what each case printed:",
        "",
        "    MUA_WRITE_CATALOG=1 .venv/bin/python -m pytest tests/test_bad_input_catalog.py",
        "",
        "rewrites this file, and `test_the_catalog_doc_is_current` fails when it is out of date.",
        "",
        "Each case runs `mua` in-process in a folder of its own (`<tmp>`, also the working directory, so the "
        "paths below are relative to it); `out` is the new run folder a sweep is pointed at and `run` a copy of a "
        "small real sweep. Each must end as a user's mistake does: exit code 2 and exactly one line `error: …` on "
        "stderr holding the expected words, no traceback, the password (`secret` in the storage URLs) never "
        "shown, and the folder's files byte for byte as before, with no new file or folder. The test of a row is "
        "`tests/test_bad_input_catalog.py::test_bad_input[ID]`.",
        "",
        f"**{len(bugs)} rows are known bugs**, marked **bug**: mua does not meet the rule there yet, the column "
        "shows what it prints today, and the test is a strict xfail, which fails once mua is fixed (then drop "
        "the case's `bug` and regenerate).",
        "",
        "Categories: "
        + ", ".join(f"[{cat}](#{_anchor(cat)}) ({sum(c.category == cat for c in CASES)})" for cat in CATEGORIES)
        + ".",  # fmt: skip
    ]
    for cat in CATEGORIES:
        lines += ["", f"## {cat}", "", "| bad input | command | what `mua` prints | test id |", "|---|---|---|---|"]
        for c in (c for c in CASES if c.category == cat):
            out = seen[c.id]
            what = (c.what + (f" — **bug**: {c.bug}" if c.bug else "")).replace("|", "\\|")
            lines.append(f"| {what} | {_cell(out.command)} | {_cell(out.printed())} | `{c.id}` |")
    return "\n".join(lines) + "\n"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def test_the_catalog_doc_is_current(world, tmp_path_factory):
    """Renders docs/bad_inputs.md from the cases' outcomes (running any case this session did not run)."""
    for case in CASES:
        if case.id not in SEEN:
            with pytest.MonkeyPatch.context() as mp:
                _play(case, world, tmp_path_factory.mktemp("case"), mp)
    assert not [c for c, out in SEEN.items() if SECRET in out.printed()], "a message shows the password"
    text = render(SEEN)
    if os.environ.get("MUA_WRITE_CATALOG") == "1":
        DOC.write_text(text)
        return
    assert DOC.is_file() and DOC.read_text() == text, (
        f"{DOC} is not what the catalog prints; regenerate it: "
        "MUA_WRITE_CATALOG=1 .venv/bin/python -m pytest tests/test_bad_input_catalog.py"
    )
