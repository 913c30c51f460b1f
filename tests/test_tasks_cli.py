"""`mua sweep` → `mua fit` → `mua transfer` through the CLI for a tiny model of each supported kind, saved
locally (Llama- and GPT-2-shaped causal LMs, RoBERTa- and BERT-shaped sequence classifiers, a ViT image
classifier), with full-finetuning trials in the same sweep; the real-model recipes load and validate."""

import json

import pytest
import tiny_hf as T
import yaml
from typer.testing import CliRunner

from mua_cli.spec.recipe import RECIPES_DIR, list_recipes, load_recipe
from mua_cli.sweep.store import load_trials
from mua_cli.ui.cli import app

runner = CliRunner()


def mua(*args):
    res = runner.invoke(app, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tasks")


KINDS = {
    # kind: (model builder, data builder, recipe fields)
    "llama-jsonl": (T.llama, lambda p: T.lm_jsonl(p / "d.jsonl"), {}),
    "gpt2-chat": (T.gpt2, lambda p: T.chat_jsonl(p / "d.jsonl"), {}),
    # 12 steps of a random RoBERTa leave flat curves whose best LR can sit at the grid's edge: the grid may grow, as
    # the refusal to predict from edge optima tells a user to let it
    "roberta-csv": (
        T.roberta,
        lambda p: T.cls_csv(p / "d.csv"),
        {"task": "seq-cls", "label_field": "sentiment", "max_extend": 2},
    ),
    "bert-dataset": (T.bert, lambda p: T.cls_dataset_folder(p / "ds"), {"task": "seq-cls", "text_field": "sentence"}),
    "vit-images": (T.vit, lambda p: T.image_folder(p / "img"), {"task": "image-cls"}),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_sweep_fit_transfer_with_full_finetuning(kind, root):
    build_model, build_data, fields = KINDS[kind]
    folder = root / kind
    folder.mkdir()
    model = build_model(folder / "model")
    data = build_data(folder)
    recipe = T.recipe_yaml(folder / "r.yaml", model=str(model), data=str(data), **fields)
    run = folder / "run"
    res = mua("sweep", "--recipe", recipe, "--ranks", "2,4,full", "--out", run, "--device", "cpu")
    assert res.exit_code == 0, res.output
    df = load_trials(run)
    groups = set(zip(df["regime"], df["rank"], strict=True))
    assert groups == {("A:r", 2), ("A:r", 4), ("B:1", 2), ("B:1", 4), ("full", 0)}
    assert (df["status"] != "failed").all(), df[df["status"] == "failed"]["error"].iloc[0]
    task = fields.get("task", "causal-lm")
    assert all(info["task"] == task for info in df["info"])
    if task != "causal-lm":  # the new head: not LoRA, its own fixed LR, said in the output and stored
        assert "head classifier (new" in res.output and "head_lr" in res.output
        for info in df["info"]:
            assert info["head"] == {"modules": ["classifier"], "lr": 1e-3, "trained": "in full (not LoRA)"}
            assert 0 <= info.get("eval_accuracy", 0) <= 1
    assert "LoRA targets (all-linear)" in res.output

    res = mua("fit", run, "--no-plot")
    assert res.exit_code == 0, res.output
    doc = json.loads((run / "fit.json").read_text())
    assert set(doc["regimes"]) == {"A:r", "B:1"} and doc["full"] is not None

    res = mua("transfer", run, "--to", "full-ft", "--json")
    assert res.exit_code == 0, res.output
    pred = json.loads(res.stdout)
    assert pred["target"] == "full-ft" and pred["lr"] > 0
    if doc["full"]["usable"]:  # measured beats predicted
        assert pred["basis"] == "measured" and pred["lr"] == pytest.approx(doc["full"]["lr_star"])
    else:
        assert pred["basis"] == "study-offset" and pred["regime"] == "B:1"
    res = mua("transfer", run, "--to", "full-ft", "--basis", "predict", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["basis"] == "study-offset"


def test_targets_and_per_layer_lr_options(root, tmp_path):
    model = T.llama(tmp_path / "model")
    data = T.lm_jsonl(tmp_path / "d.jsonl")
    recipe = T.recipe_yaml(tmp_path / "r.yaml", lrs="2^-10,2^-6,2^-2")
    args = ["sweep", "--recipe", recipe, "--model", model, "--data", data, "--device", "cpu", "--quiet"]
    res = mua(*args, "--targets", "q_proj,v_proj", "--per-layer-lr", "--regimes", "B:1", "--ranks", "2,full",
              "--out", tmp_path / "run")  # fmt: skip
    assert res.exit_code == 0, res.output
    df = load_trials(tmp_path / "run")
    assert all(r["per_layer_lr"] and r["targets"] == "q_proj,v_proj" for r in df["recipe"])
    lora = df[df["regime"] == "B:1"].iloc[0]["info"]
    assert lora["trainable_params"] == 2 * (2 * 32 + 32 * 2)  # q and v only, rank 2
    full = df[df["regime"] == "full"].iloc[0]["info"]
    assert {round(g["scale"], 4) for g in full["lr_groups"]} == {1.0, 0.5}  # down_proj: 32 / 64

    res = mua(*args, "--targets", "query,value", "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "match no linear layer" in res.output and "Traceback" not in res.output


def test_heuristic_transfer_from_a_r_only(root, tmp_path):
    model = T.llama(tmp_path / "model")
    data = T.lm_jsonl(tmp_path / "d.jsonl")
    recipe = T.recipe_yaml(tmp_path / "r.yaml", model=str(model), data=str(data), regimes="A:r")
    run = tmp_path / "run"
    res = mua("sweep", "--recipe", recipe, "--ranks", "2,4,full", "--out", run, "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    res = mua("transfer", run, "--to", "full-ft", "--basis", "predict")  # a prediction, not the measured optimum
    assert res.exit_code == 2 and "--heuristic" in res.output
    res = mua("transfer", run, "--to", "full-ft", "--basis", "predict", "--heuristic", "--json")
    assert res.exit_code == 0, res.output
    pred = json.loads(res.stdout)
    assert pred["basis"] == "heuristic" and "heuristic" in json.dumps(pred).lower()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "image-cls"], "embedded model embedded:tiny is for --task causal-lm"),
        (["--task", "speech"], "task must be 'causal-lm' or 'seq-cls' or 'image-cls', not 'speech'"),
        (["--data", "no/such/dir/data.jsonl"], "does not exist"),
        (["--model", "./no-such-model"], "does not exist"),
    ],
)
def test_bad_model_task_and_data_are_one_line(extra, message, tmp_path, micro_recipe_path):
    res = mua("sweep", "--recipe", micro_recipe_path, "--out", tmp_path / "run", "--device", "cpu", *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_classifier_with_plain_text_is_a_clear_error(tmp_path):
    model = T.bert(tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text("some text\n" * 50)
    recipe = T.recipe_yaml(tmp_path / "r.yaml", model=str(model), data=str(text), task="seq-cls")
    res = mua("sweep", "--recipe", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert res.exit_code == 2 and "plain text" in res.output


def test_every_recipe_loads_validates_and_is_listed():
    names = [name for name, _, _ in list_recipes()]
    assert {"tiny", "qwen2.5-0.5b-instruct", "roberta-base-sst2", "vit-base-beans"} <= set(names)
    res = mua("recipes")
    assert res.exit_code == 0
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        recipe = load_recipe(str(path))
        assert recipe.description, path
        if recipe.model.name.startswith("embedded:"):
            continue
        assert "GPU" in raw["description"], f"{path.name}: say which GPU it needs"
        assert recipe.wants_full and recipe.lora_ranks and recipe.model.dtype == "bfloat16"
        assert recipe.model.task in ("causal-lm", "seq-cls", "image-cls")
        assert path.stem in res.output
