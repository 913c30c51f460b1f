"""Classification out of the box: `--task seq-cls` with no model uses the embedded encoder (shipped, byte-level,
masked-LM pretrained), and the embedded causal LM asked to classify is one line before anything loads."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mua_cli.errors import MuaError
from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.store import load_trials
from mua_cli.train import encoder
from mua_cli.ui.cli import app


def test_byte_tokenizer_encodes_any_text_offline_one_token_per_byte():
    tok = encoder.tokenizer()
    for text in ("plain ascii", "Héllo wörld, 日本語 🙂\n\ttabs", ""):
        ids = tok(text)["input_ids"]
        assert ids == [encoder.BOS, *(b + encoder.BYTE_OFFSET for b in text.encode()), encoder.EOS]
        assert tok.decode(ids, skip_special_tokens=True) == text
    pair = tok("ab", "c")["input_ids"]
    assert pair == [encoder.BOS, 97 + 5, 98 + 5, encoder.EOS, encoder.EOS, 99 + 5, encoder.EOS]
    assert tok.pad_token_id == encoder.PAD and tok.mask_token_id == encoder.MASK and len(tok) == encoder.VOCAB


def test_the_encoder_ships_inside_the_package_small_and_loadable_offline():
    folder = encoder.shipped_folder()
    assert folder is not None, "run `nice python benchmarks/ship_encoder.py` to make the shipped encoder"
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 4 * 2**20
    assert json.loads((folder / "settings.json").read_text()) == json.loads(json.dumps(encoder.settings()))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    tok = AutoTokenizer.from_pretrained(folder)
    out = model(**tok(["any text", "ünïcode 🙂"], padding=True, return_tensors="pt"))
    assert out.logits.shape == (2, 3)


def test_the_shipped_encoder_was_pretrained():
    """Masked bytes of held-out windows cost far less than a uniform guess (ln 256 = 5.55 nats), which is what
    the same architecture untrained costs: the shipped weights are pretrained ones."""
    import math

    import torch
    from transformers import AutoModelForMaskedLM, RobertaConfig, RobertaForMaskedLM

    folder = encoder.shipped_folder()
    assert folder is not None
    g = torch.Generator().manual_seed(7)
    data = encoder.corpus_ids()
    starts = torch.randint(0, len(data) - 126, (16,), generator=g).tolist()
    ids = torch.stack([torch.cat([torch.tensor([encoder.BOS]), data[s : s + 126], torch.tensor([encoder.EOS])])
                       for s in starts])  # fmt: skip
    inputs, labels = encoder.mask_batch(ids, g)
    torch.manual_seed(0)
    untrained = RobertaForMaskedLM(RobertaConfig(**encoder.CONFIG)).eval()
    with torch.no_grad():
        loss = AutoModelForMaskedLM.from_pretrained(folder).eval()(input_ids=inputs, labels=labels).loss.item()
        base = untrained(input_ids=inputs, labels=labels).loss.item()
    assert base > 0.9 * math.log(256) and loss < 0.65 * math.log(256), (loss, base)


def test_seq_cls_with_no_model_or_recipe_is_the_embedded_encoder():
    r = load_recipe(task="seq-cls")
    assert (r.name, r.model.name, r.model.task, r.data.source) == ("tiny-cls", "embedded:encoder", "seq-cls",
                                                                    "embedded:corpora-cls")  # fmt: skip
    assert load_recipe(task="seq-cls", data="my.csv").data.source == "my.csv"
    assert load_recipe(task="seq-cls", model="some/model").model.name == "some/model"  # a named model: tiny's rest


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--model", "embedded:tiny", "--task", "seq-cls"], "embedded:tiny is a causal LM, not a classifier"),
        (["--recipe", "tiny", "--task", "seq-cls"], "embedded:tiny is a causal LM, not a classifier"),
        (["--recipe", "tiny-cls", "--task", "causal-lm"], "the embedded model embedded:encoder is for --task seq-cls"),
        (["--model", "embedded:huge"], "no embedded model 'embedded:huge'"),
    ],
)
def test_embedded_model_for_the_wrong_task_is_one_line_before_anything_loads(argv, says, tmp_path, monkeypatch):
    import mua_cli.train.workload as workload

    def never(*a, **kw):
        raise AssertionError("the workload loaded")

    monkeypatch.setattr(workload, "load_workload", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("text,label\na,x\nb,y\n")
    res = CliRunner().invoke(app, ["sweep", *argv, "--data", "d.csv", "--device", "cpu", "--out", "run"])
    assert res.exit_code == 2, res.output
    assert says in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_sweep_task_seq_cls_on_my_csv_works_out_of_the_box_and_prints_no_library_chatter(tmp_path):
    """The real command, as a user runs it (stdout a pipe, so one plain line per trial): it trains on the CSV, and
    stderr holds mua's own lines only: no library warning, no download or loading progress bar."""
    rng = random.Random(0)
    with open(tmp_path / "my.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(80):
            good = rng.random() < 0.5
            words = rng.sample(["fine", "great", "lovely", "nice"] if good else ["bad", "awful", "poor", "dull"], 2)
            w.writerow([f"the film was {' and '.join(words)}", "pos" if good else "neg"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run(
        [sys.executable, "-m", "mua_cli.ui.cli", "sweep", "--task", "seq-cls", "--data", "my.csv", "--ranks", "4",
         "--regimes", "B:1", "--lrs", "2^-8:2^-6", "--max-extend", "0", "--refine", "0", "--steps", "6", "--batch-size",
         "8", "--device", "cpu",
         "--out", "run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    chatter = [
        line
        for line in res.stderr.splitlines()
        if re.search(r"warn|deprecat|%\||it/s|Loading|Some weights|huggingface|\btqdm\b", line, re.I)
    ]
    assert chatter == [], res.stderr
    df = load_trials(tmp_path / "run")
    assert len(df) == 3 and set(df["status"]) == {"ok"}
    assert df.iloc[0]["recipe"]["model"] == "embedded:encoder" and df.iloc[0]["info"]["task"] == "seq-cls"


def test_encoder_settings_refuse_model_config():
    with pytest.raises(MuaError, match="embedded:encoder is shipped pretrained"):
        load_recipe("tiny-cls", model_config={"hidden_size": 64})
