"""docs/using-the-lr.md's peft + Trainer snippet runs as written, on `mua transfer --json`'s output: a tiny local
model in place of the hub name, two examples in place of the user's dataset, and the sweep's init in place."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

DOC = Path(__file__).resolve().parent.parent / "docs" / "using-the-lr.md"


def test_the_peft_trainer_snippet_runs_on_transfers_json(tmp_path, monkeypatch):
    import tiny_hf
    from synthetic import RECIPE, trials

    from mua_cli.science.fit import fit_run
    from mua_cli.ui.cli import app

    df = trials({"A:r": 0.0, "B:1": 0.0}, seeds=(0, 1), noise=0.003)
    df["steps"], df["batch_size"] = 3, 2
    df["recipe"] = [{**RECIPE, "targets": "all-linear", "task": "causal-lm"}] * len(df)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "fit.json").write_text(json.dumps(fit_run(df).to_dict()))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["transfer", "run", "--to", "16", "--json"])
    assert res.exit_code == 0, res.output
    Path("lr.json").write_text(res.stdout)

    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    model = tiny_hf.llama(tmp_path / "model")
    assert code.count('"Qwen/Qwen2.5-0.5B"') == 1
    code = code.replace('"Qwen/Qwen2.5-0.5B"', repr(str(model)))
    ids = torch.randint(3, 300, (8,))
    train_dataset = [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(0), "labels": ids.flip(0)}]
    scope = {"train_dataset": train_dataset}
    monkeypatch.setenv("WANDB_DISABLED", "true")
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 — the doc's own code, as a reader runs it

    peft_model, answer = scope["model"], json.loads(Path("lr.json").read_text())
    assert answer["regime"] == "B:1" and peft_model.peft_config["default"].r == 16
    # trained 3 steps from Init[B]: A moved off zero, at the LR the answer gave
    a = next(m.lora_A["default"].weight for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert torch.count_nonzero(a) > 0
    assert scope["args"].learning_rate == pytest.approx(answer["lr"]) and scope["args"].max_steps == 3
