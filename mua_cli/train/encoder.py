"""The embedded encoder (`embedded:encoder`): a small RoBERTa-shaped text encoder, pretrained with masked-language
modelling on the embedded corpora, for `--task seq-cls` with no model named. Shipped inside the package
(mua_cli/embedded/encoder-HASH/, made and checked by `python benchmarks/ship_encoder.py`); where it is missing
(a checkout that never made it) it is pretrained once on the CPU and cached, as the embedded causal LM is.

Its tokenizer is byte-level (one token per UTF-8 byte, no merges): any text, in any script, encodes offline, and
the same bytes always give the same ids. Byte b is token 5 + b; 0-4 are <s> <pad> </s> <unk> <mask>.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

NAME = "embedded:encoder"
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BYTE_OFFSET = len(SPECIALS)
VOCAB = BYTE_OFFSET + 256
BOS, PAD, EOS, _UNK, MASK = range(len(SPECIALS))
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=BYTE_OFFSET + 512,  # RoBERTa's positions start after the pad id: 512 tokens a text
    type_vocab_size=1,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
    hidden_dropout_prob=0.0,  # as the trials: dropout 0 (DESIGN.md)
    attention_probs_dropout_prob=0.0,
)
MAX_TOKENS = 512
# 15 % of the bytes masked (80 % <mask>, 10 % a random byte, 10 % kept), windows of 126 bytes of both corpora
PRETRAIN = dict(
    data=["embedded:shakespeare", "embedded:britannica"], steps=1200, lr=3e-3, batch_size=16, seq_len=126, seed=0
)
MASK_FRAC = 0.15


def settings() -> dict:
    """What the shipped weights were made from; its hash names their folder."""
    return {"model": NAME, "config": CONFIG, "pretrain": PRETRAIN, "mask_frac": MASK_FRAC, "tokenizer": "bytes"}


def folder_name() -> str:
    blob = json.dumps(settings(), sort_keys=True)
    return f"encoder-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "embedded"


def shipped_folder() -> Path | None:
    folder = SHIPPED_DIR / folder_name()
    return folder if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file() else None


def model_folder(on_note=None) -> Path:
    """The encoder's folder (weights, config and tokenizer, loadable by `from_pretrained`): shipped, cached, or
    pretrained now and cached."""
    if (shipped := shipped_folder()) is not None:
        return shipped
    from .models import cache_dir

    folder = cache_dir() / folder_name()
    if (folder / "model.safetensors").is_file():
        return folder
    if on_note:
        on_note(f"pretraining the embedded encoder ({PRETRAIN['steps']} steps of masked-LM, cached in {folder})")
    t0 = time.perf_counter()
    model = pretrain()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    save(model, tmp, seconds=time.perf_counter() - t0)
    try:
        tmp.rename(folder)  # atomic: a half-written cache is never picked up
    except OSError:  # another process won the race; use theirs
        pass
    return folder


def save(model, folder: Path, seconds: float | None = None) -> None:
    from .models import quiet_transformers

    quiet_transformers()  # no "Writing model shards" progress bar in a sweep's log
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    tokenizer().save_pretrained(folder)
    (folder / "settings.json").write_text(json.dumps(settings(), indent=1, sort_keys=True))
    if seconds is not None:
        (folder / "pretrain.json").write_text(json.dumps({"seconds": round(seconds, 1)}))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which the `tokenizers` ByteLevel pre-tokenizer emits."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tokenizer():
    """The byte-level tokenizer: `<s> bytes </s>`, a pair as `<s> a </s></s> b </s>` (RoBERTa's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({ch: BYTE_OFFSET + b for b, ch in _bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", EOS), ("<s>", BOS), trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=MAX_TOKENS,
    )


def corpus_ids() -> torch.Tensor:
    """Both embedded corpora as one stream of token ids (bytes + BYTE_OFFSET)."""
    from .sources import read_text

    raw = b"\n".join(read_text(spec).encode("utf-8") for spec in PRETRAIN["data"])
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() + BYTE_OFFSET


def mask_batch(ids: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: MASK_FRAC of the bytes are predicted; of those 80 % read <mask>, 10 % a random byte."""
    labels = ids.clone()
    picked = torch.rand(ids.shape, generator=g) < MASK_FRAC
    picked[:, 0] = picked[:, -1] = False  # <s> and </s>
    labels[~picked] = -100
    roll = torch.rand(ids.shape, generator=g)
    inputs = ids.clone()
    inputs[picked & (roll < 0.8)] = MASK
    swap = picked & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(BYTE_OFFSET, VOCAB, ids.shape, generator=g)[swap]
    return inputs, labels


def pretrain(steps: int | None = None, on_step=None):
    """Masked-LM pretraining on the CPU, seeded and on one thread: the same weights on any number of cores of one
    machine (another CPU or torch may round differently: `benchmarks/ship_encoder.py --check` says)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains little from more, and one thread fixes the sums' order
    try:
        return _pretrain(steps, on_step)
    finally:
        torch.set_num_threads(threads)


def _pretrain(steps: int | None, on_step):
    from transformers import RobertaConfig, RobertaForMaskedLM

    p = PRETRAIN
    steps = int(steps or p["steps"])
    torch.manual_seed(p["seed"])
    g = torch.Generator().manual_seed(p["seed"])
    model = RobertaForMaskedLM(RobertaConfig(**CONFIG))
    data = corpus_ids()
    n, b = int(p["seq_len"]), int(p["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p["lr"], total_steps=steps, pct_start=0.1)
    ends = torch.tensor([[BOS], [EOS]]).T.repeat(b, 1)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - n, (b,), generator=g)
        body = torch.stack([data[s : s + n] for s in starts.tolist()])
        ids = torch.cat([ends[:, :1], body, ends[:, 1:]], dim=1)
        inputs, labels = mask_batch(ids, g)
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step, loss.item())
    return model.eval()
