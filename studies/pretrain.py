#!/usr/bin/env python3
"""Pretrain the study's small models of other families from their transformers configs, and build their data.

No pretrained GPT-NeoX, OPT, Qwen2, GPT-2 or ViT can be had offline, so each is pretrained here briefly, as mua
pretrains its embedded Llama (models.pretrain: AdamW, one-cycle LR, gradient clipping, seed 0), and saved with
save_pretrained into MODELS/NAME, where workloads.yaml's recipes point (`{models}/NAME`):

- causal LMs: byte-level, like the embedded model: a tokenizer whose ids are the UTF-8 bytes (0-255, plus
  <|endoftext|> = 256), pretrained on mua's embedded Shakespeare (600 steps × 32 windows of 128 bytes);
- the ViT: 1-channel 32 × 32 images (8 × 8 drawings scaled up, as mua scales the digits), pretrained to tell ten
  synthetic shapes apart; only its body is saved, so every finetuning starts from a new classifier head;
- MODELS/plays.jsonl: transfer_study.py's plays task (a decoder family as a sequence classifier);
- MODELS/digits/: scikit-learn's handwritten digits (1,797 images of 8 × 8) as an image folder, the ViT's
  finetuning task. Without scikit-learn (a CPU smoke only) the digits are drawn with PIL's font instead, and
  MODELS/digits/SOURCE says so.

The models to build are the `pretrained` list of workloads.yaml. Run from the repository root:

  python studies/pretrain.py --models DIR [--only NAME,...] [--device auto|cpu|cuda] [--smoke]

A model whose folder holds pretrain.json is kept (delete the folder to build it again). --smoke: widths of 32,
one layer, 20 steps (a CPU check of the whole path). Same seed, same data, same steps: the same weights on the
same device and library versions; pretrain.json records how each was made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORKLOADS = Path(__file__).resolve().parent / "workloads.yaml"
EOS = "<|endoftext|>"
BYTES = 256  # token ids 0-255 are the bytes, as in mua's embedded model; EOS is 256
DEFAULT_PRETRAIN = {"data": "embedded:shakespeare", "steps": 600, "lr": 3e-3, "batch_size": 32, "seq_len": 128,
                    "seed": 0}  # fmt: skip

# family → (config class, model class); every dropout off: a trial's outcome depends on its LR and seed alone
FAMILIES = {
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"attention_dropout": 0.0, "hidden_dropout": 0.0}),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0},
    ),  # fmt: skip
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"attention_dropout": 0.0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    ),  # fmt: skip
}
SHAPES = ("circle", "disc", "square", "block", "triangle", "plus", "cross", "hbar", "vbar", "dots")


def log(msg: str) -> None:
    print(msg, flush=True)


def byte_tokenizer():
    """A fast tokenizer whose ids are the UTF-8 bytes (GPT-2's byte-to-character map, no merges) and EOS = 256:
    the same token stream as mua's embedded byte-level model, through the Hugging Face path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):  # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest above 255
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)
    sample = "Thou art ‘more’ lovely\n"
    ids = fast(sample)["input_ids"]
    if ids != list(sample.encode("utf-8")) or fast.convert_tokens_to_ids(EOS) != BYTES:
        raise SystemExit(f"the byte tokenizer does not give byte ids: {ids[:12]}")
    return fast


def family_config(spec: dict, vocab: int, smoke: bool):
    import transformers

    cfg_cls, _, no_dropout = FAMILIES[spec["family"]]
    cfg = {**spec.get("config", {}), **no_dropout}
    if smoke:  # one layer, width 32: the path, not the science
        for key in ("hidden_size", "n_embd"):
            if key in cfg:
                cfg[key] = 32
        for key in ("intermediate_size", "ffn_dim", "n_inner"):
            if key in cfg:
                cfg[key] = 64
        for key in ("num_hidden_layers", "n_layer"):
            if key in cfg:
                cfg[key] = 1
        for key in ("num_attention_heads", "n_head"):
            if key in cfg:
                cfg[key] = 4
        if "num_key_value_heads" in cfg:
            cfg["num_key_value_heads"] = 2
        if "word_embed_proj_dim" in cfg:
            cfg["word_embed_proj_dim"] = 32
    if spec["family"] != "vit":
        cfg.update(vocab_size=vocab, bos_token_id=BYTES, eos_token_id=BYTES, pad_token_id=BYTES)
    return getattr(transformers, cfg_cls)(**cfg)


# ------------------------------------------------------------------------------------------------- images


def shape_image(kind: int, rng):
    """One of ten shapes, drawn at random place, size and stroke on 32 × 32, shrunk to 8 × 8 with noise (the
    digits' size and look)."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("L", (32, 32), 0)
    d = ImageDraw.Draw(img)
    r = rng.uniform(7, 13)
    cx, cy = rng.uniform(r + 1, 31 - r), rng.uniform(r + 1, 31 - r)
    w = int(rng.integers(3, 6))
    box = (cx - r, cy - r, cx + r, cy + r)
    name = SHAPES[kind]
    if name == "circle":
        d.ellipse(box, outline=255, width=w)
    elif name == "disc":
        d.ellipse(box, fill=255)
    elif name == "square":
        d.rectangle(box, outline=255, width=w)
    elif name == "block":
        d.rectangle(box, fill=255)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    elif name == "plus":
        d.line([(cx - r, cy), (cx + r, cy)], fill=255, width=w)
        d.line([(cx, cy - r), (cx, cy + r)], fill=255, width=w)
    elif name == "cross":
        d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=255, width=w)
        d.line([(cx - r, cy + r), (cx + r, cy - r)], fill=255, width=w)
    elif name == "hbar":
        d.line([(cx - r, cy), (cx + r, cy)], fill=255, width=w + 2)
    elif name == "vbar":
        d.line([(cx, cy - r), (cx, cy + r)], fill=255, width=w + 2)
    else:  # two dots
        s = r / 2.5
        d.ellipse((cx - r, cy - r, cx - r + 2 * s, cy - r + 2 * s), fill=255)
        d.ellipse((cx + r - 2 * s, cy + r - 2 * s, cx + r, cy + r), fill=255)
    small = np.asarray(img.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    small = np.clip(small + rng.normal(0, 20, small.shape), 0, 255)
    return Image.fromarray(small.astype(np.uint8))


def to_pixels(img, size: int):
    """mua's preprocessing of an image without an image processor (tasks.ImageClsTask.pixels)."""
    import numpy as np
    import torch

    arr = np.asarray(img.resize((size, size)), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.reshape(size, size, -1)).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def write_digits(folder: Path) -> str:
    """scikit-learn's digits (8 × 8, values 0-16) as PNGs in one subfolder per class; without scikit-learn,
    digits drawn with PIL's default font (for a smoke run)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    if (folder / "SOURCE").is_file():
        return (folder / "SOURCE").read_text().strip()
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels, source = digits.images * (255 / 16), digits.target, "sklearn.datasets.load_digits"
    except ImportError:
        rng, font, images, labels = np.random.default_rng(0), ImageFont.load_default(), [], []
        for i in range(600):
            img = Image.new("L", (16, 16), 0)
            ImageDraw.Draw(img).text((int(rng.integers(2, 8)), int(rng.integers(0, 4))), str(i % 10), fill=255,
                                     font=font)  # fmt: skip
            small = np.asarray(img.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
            images.append(np.clip(small + rng.normal(0, 15, small.shape), 0, 255))
            labels.append(i % 10)
        source = "PIL default font (no scikit-learn: a smoke stand-in)"
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        sub = folder / str(int(label))
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img).round().astype(np.uint8)).save(sub / f"{i:04d}.png")
    (folder / "SOURCE").write_text(source + "\n")
    log(f"wrote {folder}: {len(labels)} images from {source}")
    return source


# ---------------------------------------------------------------------------------------------- pretraining


def schedule(model, pre: dict):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=pre["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pre["lr"], total_steps=int(pre["steps"]), pct_start=0.1)
    return opt, sched


def train_loop(model, pre: dict, dev: str, batch_loss) -> tuple[float, list[float]]:
    """mua's pretraining loop (models.pretrain) on `dev`, in bf16 autocast on a GPU."""
    import torch

    opt, sched = schedule(model, pre)
    model.train()
    curve = []
    for step in range(int(pre["steps"])):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = batch_loss(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == int(pre["steps"]) - 1:
            curve.append(round(loss.item(), 4))
    return curve[-1], curve


def pretrain_lm(spec: dict, pre: dict, dev: str, smoke: bool, out: Path) -> dict:
    import torch
    import transformers

    from mua_cli.train.data import load_text_data
    from mua_cli.train.models import lm_loss

    tok = byte_tokenizer()
    data = load_text_data(pre["data"], int(pre["seq_len"]), 0.0)  # byte ids: exactly the byte tokenizer's
    torch.manual_seed(pre["seed"])
    config = family_config(spec, BYTES + 8, smoke)  # 264 embeddings: the bytes, EOS, a round size
    model = getattr(transformers, FAMILIES[spec["family"]][1])(config).to(dev)
    starts = data.batch_starts(pre["seed"], int(pre["steps"]), int(pre["batch_size"]))
    tokens = data.train.to(dev)
    final, curve = train_loop(model, pre, dev, lambda s: lm_loss(model, data.windows(tokens, starts[s].to(dev))))
    model.cpu().save_pretrained(out)
    tok.save_pretrained(out)
    return {"final_loss": final, "loss_curve_every_50": curve, "n_params": sum(p.numel() for p in model.parameters())}


def pretrain_vit(spec: dict, pre: dict, dev: str, smoke: bool, out: Path) -> dict:
    import numpy as np
    import torch
    import transformers

    config = family_config(spec, 0, smoke)
    config.num_labels = len(SHAPES)
    rng = np.random.default_rng(pre["seed"])
    n = int(pre.get("images", 6000))
    labels = torch.tensor([i % len(SHAPES) for i in range(n)])
    pixels = torch.stack([to_pixels(shape_image(int(k), rng), config.image_size) for k in labels])
    torch.manual_seed(pre["seed"])
    model = transformers.ViTForImageClassification(config).to(dev)
    g = torch.Generator().manual_seed(10_000 + pre["seed"])
    order = torch.randint(0, n, (int(pre["steps"]), int(pre["batch_size"])), generator=g)
    pixels, labels = pixels.to(dev), labels.to(dev)

    def loss(step: int):
        idx = order[step].to(dev)
        logits = model(pixel_values=pixels[idx]).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels[idx])

    final, curve = train_loop(model, pre, dev, loss)
    model.eval()
    with torch.no_grad():  # accuracy on fresh shapes: did it learn to see?
        test_rng = np.random.default_rng(pre["seed"] + 1)
        test_y = torch.tensor([i % len(SHAPES) for i in range(500)])
        test_x = torch.stack([to_pixels(shape_image(int(k), test_rng), config.image_size) for k in test_y])
        acc = (model(pixel_values=test_x.to(dev)).logits.argmax(-1).cpu() == test_y).float().mean().item()
    body = model.vit.cpu()  # the body alone: finetuning on digits always starts from a new head
    body.config.architectures = ["ViTModel"]
    body.save_pretrained(out)
    return {"final_loss": final, "loss_curve_every_50": curve, "shape_accuracy": round(acc, 4),
            "n_params": sum(p.numel() for p in body.parameters()), "classes": list(SHAPES)}  # fmt: skip


def build(spec: dict, models: Path, device: str, smoke: bool) -> dict:
    import torch
    import transformers

    out = models / spec["name"]
    if (out / "pretrain.json").is_file():
        return json.loads((out / "pretrain.json").read_text())
    pre = {**DEFAULT_PRETRAIN, **spec.get("pretrain", {})}
    if smoke:
        pre.update(steps=20, batch_size=8)
    dev = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    t0 = time.perf_counter()
    facts = (pretrain_vit if spec["family"] == "vit" else pretrain_lm)(spec, pre, dev, smoke, tmp)
    record = {"name": spec["name"], "family": spec["family"], "pretrain": pre, "seconds": round(time.perf_counter()
              - t0, 1), "device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
              "smoke": smoke, "by": "studies/pretrain.py", **facts}  # fmt: skip
    (tmp / "pretrain.json").write_text(json.dumps(record, indent=2))
    tmp.rename(out)
    log(f"pretrained {spec['name']} ({spec['family']}, {facts['n_params']:,} parameters) on {dev} in "
        f"{record['seconds']}s: final loss {facts['final_loss']:.3f}" + (f", shape accuracy {facts['shape_accuracy']}"
        if "shape_accuracy" in facts else ""))  # fmt: skip
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="output folder (the study's --models)")
    p.add_argument("--only", help="names from workloads.yaml's pretrained list, joined by ','")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="width 32, one layer, 20 steps")
    args = p.parse_args()
    from mua_cli.train.models import quiet_transformers

    quiet_transformers()
    models = Path(args.models)
    models.mkdir(parents=True, exist_ok=True)
    specs = yaml.safe_load(WORKLOADS.read_text())["pretrained"]
    wanted = args.only.split(",") if args.only else [s["name"] for s in specs]
    unknown = set(wanted) - {s["name"] for s in specs}
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}")
    write_digits(models / "digits")
    if not (models / "plays.jsonl").is_file():  # the plays task, for a decoder as a sequence classifier
        from transfer_study import build_plays

        log(f"wrote {models / 'plays.jsonl'}: {build_plays(models / 'plays.jsonl')}")
    for spec in specs:
        if spec["name"] in wanted:
            build(spec, models, args.device, args.smoke)


if __name__ == "__main__":
    main()
