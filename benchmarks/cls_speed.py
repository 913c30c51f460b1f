"""Classifiers: mua's sweep against a plain serial peft loop, on the same trials, in the same run.

    python benchmarks/cls_speed.py [--only minilm,minilm-text,vit-base] [--steps 100] [--device cuda:0]
        [--model PATH --data PATH]   # minilm with other weights and labelled data (e.g. a real checkpoint)
        [--out FILE]                 # default benchmarks/out/cls_speed-<UTC time>.json (benchmarks/record.py)
    python benchmarks/cls_speed.py --text-stats   # minilm-text's corpus: texts, classes, lengths in tokens

The workloads' builders here are also gpu_speed.py's (which races them as a user runs mua: `mua sweep`, `mua
fit`, `mua transfer`). Built with random weights (step time does not depend on them; the hubs are out of reach):
- minilm: a BERT of all-MiniLM-L6-v2's shape (22.7M parameters: width 384, 6 layers, vocabulary 30522),
  sequence classification of sentences of random words that hold a class word, batch 16, at most 128 tokens;
- minilm-text: the same BERT on real text of real length: the docstrings of ten packages of the running Python's
  standard library (asyncio, email, http, importlib, json, logging, multiprocessing, unittest, urllib, xml), read
  from their sources with `ast` (nothing imported, nothing downloaded), joined in source order into texts of 48
  to 90 words (about 64 to 128 tokens), each labelled by its package; a WordPiece tokenizer trained on those
  texts (`tokenizers`), so that the words split as in a real vocabulary;
- vit-base: a ViT-Base/16 (86M: width 768, 12 layers, 224 × 224 images), image classification of noise images
  whose class is a faint tint (red or blue channel a little brighter), 15 % of labels flipped so that no LR
  reaches a loss of 0, batch 16.
Each sweeps 8 LoRA trials per rank (B:1, rank 8 by default, LRs 2^-12 … 2^-5; ViT 2^-16 … 2^-9), one seed,
a new head trained in full at head_lr. `--repeats N` times the plain loop and mua N times each, alternately,
after a warm-up trial of the plain loop (CUDA's start and kernel autotuning are paid before any timing).

- plain: what one writes by hand: per trial a copy of the fp32 base, peft `get_peft_model` with the head in
  modules_to_save (μA's init, as mua sets it), torch AdamW over the adapters at the trial's LR and the head at
  head_lr, LambdaLR warmup + cosine, bf16 autocast, batches padded to their longest example, `loss.item()`
  every step, then the held-out evaluation mua also runs; one trial after another.
- mua: `run_sweep` over the same trials: one GPU, its memory plan, CUDA graphs, batched trials, bf16 frozen
  base. Its wall time includes loading the model and the data.
- Science check: the best LR of mua's trials is within one grid step of the plain loop's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from record import Recording, table  # noqa: E402

from mua_cli.api import Execution, Listener, Recipe, load_trials, run_sweep  # noqa: E402
from mua_cli.train.adapters import head_modules, param_groups, prepare  # noqa: E402
from mua_cli.train.loop import lr_lambda  # noqa: E402
from mua_cli.train.workload import load_workload  # noqa: E402

WORDS = ("river stone north market winter garden letter window silver harbor candle forest morning "
         "engine paper valley mirror castle thunder meadow").split()  # fmt: skip


def save_minilm(path: Path, tokenizer, small: bool) -> None:
    """A MiniLM-shaped BERT (random weights, seeded; a 1-layer toy when `small`) and its tokenizer into `path`."""
    from transformers import BertConfig, BertModel

    shape = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    if small:
        shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def minilm(folder: Path, n: int, small: bool) -> tuple[Path, Path]:
    """A MiniLM-shaped BERT, a word-level tokenizer, and n sentences labelled by the class word they hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "bright", "dark", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")  # fmt: skip
    save_minilm(folder / "model", fast, small)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 120))]
        words.insert(rng.randrange(len(words)), ("dark", "bright")[i % 2])
        rows.append({"text": " ".join(words), "label": ("negative", "positive")[i % 2]})
    data = folder / "sentences.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "model", data


# ten packages found in every CPython since 3.8 (distutils left 3.12, tkinter is a separate package on some
# systems): their docstrings hold 2,500 to 14,000 words each
PACKAGES = ("asyncio", "email", "http", "importlib", "json", "logging", "multiprocessing", "unittest", "urllib", "xml")


def docstring_texts(packages=PACKAGES, words=(48, 90), seed: int = 0) -> list[dict]:
    """Texts of real length from the standard library's docstrings, labelled by package, the same on every run
    of one Python version: each package's docstrings (modules, classes, functions, in sorted file order and source
    order; tests left out), whitespace collapsed, joined until a text holds its drawn number of words."""
    import ast
    import sysconfig

    std = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    rows = []
    for name in packages:
        if not (std / name).is_dir():
            continue
        chunk: list[str] = []
        want = rng.randint(*words)
        for path in sorted((std / name).rglob("*.py")):
            if any(p.startswith("test") for p in path.relative_to(std / name).parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    chunk += doc.split() if doc else []
                    while len(chunk) >= want:
                        rows.append({"text": " ".join(chunk[:want]), "label": name})
                        chunk, want = chunk[want:], rng.randint(*words)
    rng.shuffle(rows)
    return rows


def wordpiece(texts: list[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer (lower case, [CLS] … [SEP]) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip


def minilm_text(folder: Path, n: int, small: bool) -> tuple[Path, Path]:
    """A MiniLM-shaped BERT (random weights) with a WordPiece tokenizer trained on the texts, and the standard
    library's docstrings labelled by package (`n` is not used: the corpus is what the sources hold; `small`: a
    tiny model, three packages)."""

    rows = docstring_texts(PACKAGES[:3] if small else PACKAGES)
    fast = wordpiece([r["text"] for r in rows], 2000 if small else 30522)
    save_minilm(folder / "model", fast, small)
    data = folder / "docstrings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "model", data


def text_stats(model: Path, data: Path) -> dict:
    """The texts' lengths in tokens ([CLS] and [SEP] counted) and their labels, as the recipe's tokenizer reads
    them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lengths = sorted(len(tok(r["text"])["input_ids"]) for r in rows)
    q = lambda f: lengths[min(len(lengths) - 1, int(f * len(lengths)))]  # noqa: E731
    labels = sorted({r["label"] for r in rows})
    return {"texts": len(rows), "classes": len(labels), "labels": labels, "tokens_min": lengths[0],
            "tokens_p10": q(0.1), "tokens_median": q(0.5), "tokens_p90": q(0.9), "tokens_max": lengths[-1],
            "share_64_to_128": round(sum(64 <= x <= 128 for x in lengths) / len(lengths), 3),
            "share_over_128": round(sum(x > 128 for x in lengths) / len(lengths), 3)}  # fmt: skip


TINT, FLIP = 56, 0.15  # the ViT task's class signal and label noise


def vit_base(folder: Path, n: int, small: bool) -> tuple[Path, Path]:
    """A ViT-Base/16 with its image processor, and n noise images tinted faintly by class, 15 % of them under the
    other class's folder."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    cfg = ViTConfig() if not small else ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder / "model")
    ViTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    for i in range(n):
        tint, channel = (("blue", 2), ("red", 0))[i % 2]
        arr = rng.integers(0, 200, (48, 48, 3), dtype=np.uint8)
        arr[..., channel] += rng.integers(0, TINT, (48, 48), dtype=np.uint8)  # the class: a faint tint
        cls = tint if rng.random() >= FLIP else ("red" if tint == "blue" else "blue")
        (folder / "images" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / "images" / cls / f"{i:04d}.png")
    return folder / "model", folder / "images"


WORKLOADS = {
    "minilm": (minilm, "seq-cls"),
    "minilm-text": (minilm_text, "seq-cls"),
    "vit-base": (vit_base, "image-cls"),
}


def recipe_for(name: str, model: Path, data: Path, steps: int, ranks: str = "8") -> Recipe:
    task = WORKLOADS[name][1]
    keys = dict(
        name=f"bench-{name}", model=str(model), data=str(data), task=task, seq_len=128, batch_size=16,
        steps=steps, eval_fraction=0.1, dtype="bfloat16", ranks=ranks, regimes="B:1", lrs="2^-12:2^-5", seeds=1,
        max_extend=0, refine=0,
    )  # fmt: skip
    return Recipe.of(**keys, **({"label_field": "label"} if task == "seq-cls" else {})).replace(
        **OVERRIDES.get(name, {})
    )


# The ViT task's LRs: LoRA at 2^-10 and above leaves the randomly initialized ViT unstable in both loops; and with
# flipped labels one batch's loss can pass twice the first batch's by chance, so a trial stops only at 4×: both
# loops then run every step of every trial, which is what the timing compares.
VIT = {"lrs": "2^-16:2^-9", "divergence_factor": 4.0}
# The text classifier's LRs: on 2^-12:2^-5 its optimum sat at the low edge (2^-12 in mua's sweep, 2^-11 in the
# plain loop; gpu_speed.py, one H100, 2026-12-07), where `mua transfer` rightly refuses to answer, so a race had
# no time to answer. Eight LRs still, centred on that optimum.
OVERRIDES = {"vit-base": VIT, "minilm-text": {"lrs": "2^-15:2^-8"}}


def plain_trial(spec, base, task, recipe: Recipe, device: str) -> float:
    """The plain loop; returns the final metric (mean training loss of the last 10 % of steps; inf if diverged)."""
    head = head_modules(base, recipe.model.task)
    model = (
        prepare(base, spec.regime, spec.rank, recipe.optim.alpha0, recipe.model.targets, spec.seed, head)
        .to(device)
        .train()
    )
    groups = param_groups(model, spec.regime, spec.lr, head, recipe.optim.head_lr)
    opt = torch.optim.AdamW(groups.groups, lr=spec.lr, weight_decay=recipe.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.optim))
    batch_at = task.train_batches(spec.seed, recipe.optim.steps, recipe.optim.batch_size, device)
    cuda = device.startswith("cuda")
    losses = []
    for step in range(recipe.optim.steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            batch = batch_at(step)
            loss = task.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(groups.params, recipe.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or losses[-1] > recipe.optim.divergence_factor * losses[0]:
            return math.inf
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        task.evaluate(model, recipe.optim.batch_size, device)
    tail = losses[-max(1, math.ceil(recipe.optim.metric_frac * len(losses))) :]
    return sum(tail) / len(tail)


def trials_of(df) -> list[SimpleNamespace]:
    """The trials of a run's store (`mua_cli.api.load_trials`), in the order they were stored."""
    rows = df.sort_values("number")
    return [SimpleNamespace(regime=r["regime"], rank=int(r["rank"]), lr=float(r["lr"]), seed=int(r["seed"]))
            for _, r in rows.iterrows()]  # fmt: skip


def best_lr(metrics: dict) -> float | None:
    finite = {lr: m for lr, m in metrics.items() if math.isfinite(m)}
    return min(finite, key=finite.get) if finite else None


class Notes(Listener):
    def __init__(self):
        self.lines: list[str] = []

    def note(self, message: str) -> None:
        self.lines.append(message)


def measure(
    name: str,
    steps: int,
    device: str,
    model: str | None,
    data: str | None,
    small: bool,
    ranks: str = "8",
    repeats: int = 1,
    ex: Execution | None = None,
) -> dict:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        if model is None:
            made = WORKLOADS[name][0](folder, 16 * steps + 200, small)
            model, data = str(made[0]), str(made[1])
        recipe = recipe_for(name, Path(model), Path(data), steps, ranks)
        plain_recipe = recipe.replace(dtype="float32")
        plain_times, mua_times = [], []
        for rep in range(repeats):
            notes = Notes()
            t0 = time.perf_counter()
            run_sweep(recipe, folder / f"run{rep}", device, notes, execution=ex or Execution(device))
            mua_times.append(time.perf_counter() - t0)
            df = load_trials(folder / f"run{rep}")
            specs = trials_of(df)  # the plain loop runs exactly the trials mua ran
            work = load_workload(plain_recipe, "cpu")  # batches padded each to its longest example, as a collator does
            work.base.to(device)
            if rep == 0:  # CUDA's start and cuDNN's autotuning, paid before any timing
                plain_trial(specs[0], work.base, work.task, plain_recipe.replace(steps=4), device)
            t0 = time.perf_counter()
            plain = {(s.rank, s.lr): plain_trial(s, work.base, work.task, plain_recipe, device) for s in specs}
            plain_times.append(time.perf_counter() - t0)
            del work
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        plain_s, mua_s = statistics.median(plain_times), statistics.median(mua_times)
    mua = {(int(r["rank"]), float(r.lr)): float(r.metric) for _, r in df.iterrows()}
    first = min(k[0] for k in plain)  # the best LR compared at the first rank
    plain = {lr: m for (rank, lr), m in plain.items() if rank == first}
    mua = {lr: m for (rank, lr), m in mua.items() if rank == first}
    bp, bm = best_lr(plain), best_lr(mua)
    infos = [i for i in df["info"] if isinstance(i, dict)]
    errors = sorted({str(e).splitlines()[0] for e in df.get("error", []) if isinstance(e, str) and e})
    # what mua's choice costs in the plain loop's own trials: its loss at mua's best LR less its best loss
    regret = plain.get(bm, math.inf) - plain[bp] if bp is not None and bm is not None else None
    return {
        "workload": name, "trials": len(specs), "ranks": ranks, "steps": steps,
        "plain_s": round(plain_s, 1), "mua_s": round(mua_s, 1), "x_plain": round(plain_s / mua_s, 2),
        "repeats": {"plain_s": [round(t, 1) for t in plain_times], "mua_s": [round(t, 1) for t in mua_times],
                    "x_plain": [round(p / m, 2) for p, m in zip(plain_times, mua_times, strict=True)]},
        "asked": {"workers_per_gpu": ex.workers_per_gpu, "batch_trials": ex.batch_trials} if ex else "defaults",
        "plain_trials_per_h": round(len(specs) * 3600 / plain_s), "mua_trials_per_h": round(len(specs) * 3600 / mua_s),
        "best_lr_plain": bp, "best_lr_mua": bm,
        "best_lr_within_one_step": bp is not None and bm is not None and abs(math.log2(bm / bp)) <= 1,
        "plain_loss_at_mua_best_minus_best": None if regret is None else round(regret, 4),
        "plain_metric_by_lr": {f"{lr:.3g}": round(m, 4) for lr, m in sorted(plain.items())},
        "mua_metric_by_lr": {f"{lr:.3g}": round(m, 4) for lr, m in sorted(mua.items())},
        "errors": errors,
        "failed": int((df["status"] == "failed").sum()),
        "batched_with": sorted({i.get("batched_with", 1) for i in infos}),
        "peak_gib": max((i.get("peak_memory_gib", 0) for i in infos), default=None),
        "capture_fallbacks": sum("capture failed" in n for n in notes.lines),
        "notes": [n for n in notes.lines if "memory plan" in n or "one by one" in n or "capture" in n],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="minilm,minilm-text,vit-base")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--model", help="minilm only: a saved sequence classifier (or body) with its tokenizer")
    ap.add_argument("--data", help="with --model: labelled records (JSONL with text and label fields)")
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke test of this script on the CPU")
    ap.add_argument("--ranks", default="8", help="LoRA ranks: 8 trials each")
    ap.add_argument("--repeats", type=int, default=1, help="time each loop this many times; report the medians")
    ap.add_argument("--workers-per-gpu", type=int, default=0, help="mua's slots (0: its own choice)")
    ap.add_argument("--batch-trials", type=int, default=0, help="mua's trials per pass (0: its own choice)")
    ap.add_argument("--out", help="the JSON file (default: benchmarks/out/cls_speed-<UTC time>.json)")
    ap.add_argument("--text-stats", action="store_true", help="print minilm-text's corpus (texts, classes, "
                    "lengths in tokens) and exit")  # fmt: skip
    args = ap.parse_args()
    if args.text_stats:
        with tempfile.TemporaryDirectory() as d:
            rows = docstring_texts()
            wordpiece([r["text"] for r in rows], 30522).save_pretrained(Path(d) / "model")
            (Path(d) / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            stats = text_stats(Path(d) / "model", Path(d) / "texts.jsonl")
            counts = {x: sum(r["label"] == x for r in rows) for x in stats["labels"]}
            print(json.dumps({**stats, "per_class": counts, "python": sys.version.split()[0]}))
        return
    rec = Recording("cls_speed")
    print(rec.header(), flush=True)
    ex = Execution(args.device, args.workers_per_gpu, args.batch_trials)
    for name in args.only.split(","):
        given = (args.model, args.data) if name == "minilm" and args.model else (None, None)
        rec.add("rows", measure(name, args.steps, args.device, *given, args.small, args.ranks, args.repeats, ex))
        print(json.dumps(rec.doc["rows"][-1]), flush=True)
        path = rec.save(args.out)
    cols = ["workload", "trials", "steps", "plain_s", "mua_s", "x_plain", "best_lr_within_one_step", "failed"]
    print(table(rec.doc["rows"], cols))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
