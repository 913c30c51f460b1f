"""Tiny Hugging Face models, tokenizers and datasets built offline for the tests (no hub access).

Models are Llama-, GPT-2-, RoBERTa-, BERT- and ViT-shaped, width 32, one layer, saved with `save_pretrained`
together with a byte-level BPE tokenizer trained here on a few sentences (or a ViT image processor)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

WORDS = (
    "the a river mountain city small large old new bright dark quiet loud ship road tree stone house king queen "
    "walks runs sings reads writes builds sees finds holds carries over under near beside through across"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(n)]


def tokenizer(folder: Path | None = None, chat: bool = True):
    """A byte-level BPE tokenizer (about 300 tokens, <pad>=0 <s>=1 </s>=2 <unk>=3), trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences(200, seed=99), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def pretrain_lm(model, steps: int = 60, lr: float = 1e-2, seq_len: int = 24):
    """A few steps of next-token training on the sentences, so that LoRA finetuning has a base to adapt."""
    tok = tokenizer(chat=False)
    ids = torch.tensor(tok("\n".join(sentences(300, seed=7)))["input_ids"])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (8,), generator=g)
        batch = torch.stack([ids[s : s + seq_len + 1] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _save(model, folder: Path, tok: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tok:
        tokenizer(folder)
    return folder


def llama(folder: Path, vocab: int = 300) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return _save(pretrain_lm(LlamaForCausalLM(cfg)), folder)


def gpt2(folder: Path, vocab: int = 300) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=128, bos_token_id=1, eos_token_id=2)
    return _save(pretrain_lm(GPT2LMHeadModel(cfg)), folder)


def roberta(folder: Path, vocab: int = 300) -> Path:
    """A RoBERTa body without a classification head: loading it for seq-cls makes a new head."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return _save(RobertaModel(cfg, add_pooling_layer=False), folder)


def bert(folder: Path, vocab: int = 300) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, pad_token_id=0,
    )  # fmt: skip
    return _save(BertModel(cfg), folder)


def vit(folder: Path, image_size: int = 16, processor: bool = True) -> Path:
    """A ViT body (no classifier) with its image processor: loading it for image-cls makes a new head."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=image_size, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    _save(ViTModel(cfg, add_pooling_layer=False), folder, tok=False)
    if processor:
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- data


def lm_jsonl(path: Path, n: int = 120) -> Path:
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(n)))
    return path


def chat_jsonl(path: Path, n: int = 60) -> Path:
    s = sentences(2 * n, seed=5)
    rows = [{"messages": [{"role": "user", "content": s[2 * i]}, {"role": "assistant", "content": s[2 * i + 1]}]}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled(n: int = 80, seed: int = 1) -> list[dict]:
    """Sentences whose label is learnable: 'positive' ones hold 'bright', 'negative' ones 'dark'."""
    rng = random.Random(seed)
    rows = []
    for i, s in enumerate(sentences(n, seed=seed)):
        label = i % 2
        word = "bright" if label else "dark"
        words = s.rstrip(".").split()
        words.insert(rng.randrange(len(words) + 1), word)
        rows.append({"text": " ".join(words) + ".", "label": label, "sentiment": ["negative", "positive"][label]})
    return rows


def cls_csv(path: Path, n: int = 80) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "sentiment"])
        w.writeheader()
        for r in labelled(n):
            w.writerow({"text": r["text"], "sentiment": r["sentiment"]})
    return path


def cls_dataset_folder(folder: Path, n: int = 80) -> Path:
    """A `datasets` DatasetDict (train / test) saved with save_to_disk, labels as a ClassLabel."""
    import datasets

    rows = labelled(n)
    feats = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    ds = datasets.Dataset.from_dict(
        {"sentence": [r["text"] for r in rows], "label": [r["label"] for r in rows]}, features=feats
    )
    datasets.DatasetDict({"train": ds, "test": ds.select(range(8))}).save_to_disk(str(folder))
    return folder


def image_folder(folder: Path, per_class: int = 12, size: int = 20) -> Path:
    """Class-per-subfolder PNGs: 'red' images are reddish, 'blue' ones bluish, with noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, channel in (("blue", 2), ("red", 0)):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            arr[..., channel] = rng.integers(150, 255, (size, size), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i:03d}.png")
    return folder


def recipe_yaml(path: Path, **fields) -> Path:
    """A small recipe for a CLI test: few steps, 3 LRs, ranks 2,4, no grid extension."""
    import yaml

    base = {
        "name": path.stem,
        "description": "test recipe",
        "seq_len": 16,
        "steps": 12,
        "batch_size": 4,
        "ranks": "2,4",
        "regimes": "A:r,B:1",
        "lrs": "2^-13,2^-10,2^-7,2^-4,2^-1,2^2",
        "max_extend": 0,
    }
    path.write_text(yaml.safe_dump({**base, **fields}))
    return path
