"""Hugging Face models of each kind from local folders; the classification head kept out of LoRA and trained
at its own LR; per-layer LR groups; dtypes; clear errors for bad models and targets."""

import math

import pytest
import tiny_hf as T
import torch
from peft.tuners.lora import LoraLayer

from mua_cli.errors import MuaError
from mua_cli.spec.recipe import recipe_from_dict
from mua_cli.train.adapters import head_modules, lora_target_names, param_groups, prepare, trainable_parameters
from mua_cli.train.models import hidden_size, load_hf, load_tokenizer
from mua_cli.train.workload import load_workload


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": T.llama(root / "llama"),
        "gpt2": T.gpt2(root / "gpt2"),
        "roberta": T.roberta(root / "roberta"),
        "bert": T.bert(root / "bert"),
        "vit": T.vit(root / "vit"),
    }


@pytest.mark.parametrize(
    "kind, task, head",
    [
        ("llama", "causal-lm", []),
        ("gpt2", "causal-lm", []),
        ("llama", "seq-cls", ["score"]),
        ("gpt2", "seq-cls", ["score"]),
        ("roberta", "seq-cls", ["classifier"]),
        ("bert", "seq-cls", ["classifier"]),
        ("vit", "image-cls", ["classifier"]),
    ],
)
def test_every_kind_loads_from_a_local_folder(folders, kind, task, head):
    labels = None if task == "causal-lm" else ["a", "b", "c"]
    loaded = load_hf(str(folders[kind]), task, labels=labels)
    assert head_modules(loaded.model, task) == head
    if head:
        assert loaded.new_weights and all(w.startswith(head[0]) for w in loaded.new_weights)
        assert loaded.model.config.num_labels == 3 and loaded.model.config.id2label[2] == "c"
    assert hidden_size(loaded.model) == 32


def test_head_is_not_lora_adapted_but_trained_in_full(folders):
    base = load_hf(str(folders["roberta"]), "seq-cls", labels=["n", "p"]).model.eval()
    head = head_modules(base, "seq-cls")
    model = prepare(base, "B:1", 4, 1.0, "all-linear", seed=0, head=head)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert adapted and not any(".classifier." in n for n in adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in trainable)
    x = torch.randint(4, 300, (2, 10))
    with torch.no_grad():  # B A = 0 and the head's copy equals the original: same output at step 0
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)


def test_head_gets_its_own_fixed_lr_in_lora_and_full_finetuning(folders):
    base = load_hf(str(folders["vit"]), "image-cls", labels=["x", "y"]).model
    head = head_modules(base, "image-cls")
    for regime in ("A:r", "full"):
        model = prepare(base, regime, 4, 1.0, "all-linear", seed=0, head=head)
        groups = param_groups(model, regime, 0.01, head, head_lr=1e-3)
        by_name = {g.name: g for g in groups.info}
        assert by_name["head (classifier)"].lr == 1e-3 and by_name["body"].lr == 0.01
        assert len(groups.params) == len(trainable_parameters(model))
        head_params = groups.groups[[g.name for g in groups.info].index("head (classifier)")]["params"]
        assert sum(p.numel() for p in head_params) == 32 * 2 + 2


def test_default_groups_are_one_group_in_model_order(folders):
    base = load_hf(str(folders["llama"]), "causal-lm").model
    model = prepare(base, "A:r", 4, 1.0, "all-linear", seed=0)
    groups = param_groups(model, "A:r", 0.01)
    assert len(groups.groups) == 1 and "lr" not in groups.groups[0]
    assert [id(p) for p in groups.params] == [id(p) for p in trainable_parameters(model)]


@pytest.mark.parametrize("regime, power", [("B:1", 1.0), ("A:r", 0.5), ("full", 1.0)])
def test_per_layer_lr_scales_by_fan_in(folders, regime, power):
    """Llama-shaped, width 32, MLP 64: down_proj has fan-in 64, so its LR is lr · (32/64)^power."""
    base = load_hf(str(folders["llama"]), "causal-lm").model
    model = prepare(base, regime, 4, 1.0, "all-linear", seed=0)
    groups = param_groups(model, regime, 0.01, per_layer=True, base_n=hidden_size(base))
    lr_of = {id(p): g.get("lr", 0.01) for g in groups.groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        expected = 0.01 * (32 / 64) ** power if "down_proj" in name and "bias" not in name else 0.01
        assert lr_of[id(p)] == pytest.approx(expected), name
    assert len(groups.params) == len(trainable_parameters(model))


def test_gpt2_conv1d_fan_in_and_targets(folders):
    base = load_hf(str(folders["gpt2"]), "causal-lm").model
    names = lora_target_names(base, "all-linear")
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}  # lm_head left out
    model = prepare(base, "full", 0, 1.0, "all-linear", seed=0)
    groups = param_groups(model, "full", 1.0, per_layer=True, base_n=32)
    scales = {g.scale for g in groups.info}
    assert scales == {1.0, 32 / 128}  # mlp.c_proj has fan-in 4 · 32


def test_targets_override_and_bad_targets(folders):
    base = load_hf(str(folders["llama"]), "causal-lm").model
    names = lora_target_names(base, "q_proj,v_proj")
    assert [n.rsplit(".", 1)[-1] for n in names] == ["q_proj", "v_proj"]
    model = prepare(base, "B:1", 2, 1.0, "q_proj,v_proj", seed=0)
    assert len([m for m in model.modules() if isinstance(m, LoraLayer)]) == 2
    with pytest.raises(MuaError, match="match no linear layer.*q_proj"):
        lora_target_names(base, "query,value")


def test_bf16_base_trains_fp32_weights(folders):
    base = load_hf(str(folders["roberta"]), "seq-cls", labels=["n", "p"], dtype=torch.bfloat16).model
    assert next(base.parameters()).dtype == torch.bfloat16
    for regime in ("B:1", "full"):
        model = prepare(base, regime, 4, 1.0, "all-linear", seed=0, head=["classifier"])
        assert all(p.dtype == torch.float32 for p in trainable_parameters(model))


def test_tokenizer_gets_a_pad_token(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = T.tokenizer()
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    bare.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>"


def test_bad_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(MuaError, match="does not exist"):
        load_hf(str(tmp_path / "nope"), "causal-lm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MuaError, match="no config.json"):
        load_hf(str(tmp_path / "empty"), "causal-lm")
    with pytest.raises(MuaError, match="at least 2 classes"):
        load_hf(str(T.bert(tmp_path / "bert")), "seq-cls", labels=["only"])


def test_workload_on_cpu_runs_bf16_recipes_in_fp32(folders, tmp_path):
    data = T.cls_csv(tmp_path / "d.csv", n=20)
    recipe = recipe_from_dict(
        {"model": str(folders["bert"]), "task": "seq-cls", "data": str(data), "label_field": "sentiment",
         "dtype": "bfloat16", "seq_len": 16}
    )  # fmt: skip
    work = load_workload(recipe, "cpu")
    assert next(work.base.parameters()).dtype == torch.float32
    assert any("float32" in n for n in work.notes) and any("head classifier (new" in n for n in work.notes)
    batch = work.task.train_batches(0, 2, 4, "cpu")(0)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 16
    with torch.no_grad():
        assert math.isfinite(float(work.task.loss(work.base, batch)))


def test_embedded_model_is_only_a_causal_lm():
    with pytest.raises(MuaError, match="embedded model embedded:tiny is a causal LM, not a classifier"):
        load_workload(recipe_from_dict({"model": "embedded:tiny", "task": "seq-cls"}), "cpu")


def test_image_model_without_processor_resizes_to_its_config(tmp_path):
    model = T.vit(tmp_path / "vit", image_size=16, processor=False)
    images = T.image_folder(tmp_path / "img", per_class=4, size=23)
    recipe = recipe_from_dict({"model": str(model), "task": "image-cls", "data": str(images)})
    work = load_workload(recipe, "cpu")
    batch = work.task.train_batches(0, 2, 3, "cpu")(1)
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].abs().max() <= 1.0
    assert work.task.names == ["blue", "red"]


def test_model_folder_without_tokenizer_is_a_clear_error(tmp_path):
    model = T.vit(tmp_path / "vit")  # no tokenizer saved
    recipe = recipe_from_dict({"model": str(model), "task": "seq-cls", "data": str(T.cls_csv(tmp_path / "d.csv"))})
    with pytest.raises(MuaError, match="holds no tokenizer"):
        load_workload(recipe, "cpu")


def test_a_new_classification_head_is_the_same_whatever_ran_before(folders):
    """The head a classifier gets for the data's classes is drawn from a seeded generator, so two slots, or two
    runs of a sweep, train from the same head; the process's own random stream is left where it was."""
    first = load_hf(str(folders["roberta"]), "seq-cls", labels=["n", "p", "q"]).model
    torch.manual_seed(1234)
    torch.rand(1000)  # what a trial before would have drawn
    mark = torch.random.get_rng_state()
    second = load_hf(str(folders["roberta"]), "seq-cls", labels=["n", "p", "q"]).model
    assert torch.equal(torch.random.get_rng_state(), mark)
    heads = [{k: v for k, v in m.state_dict().items() if k.startswith("classifier")} for m in (first, second)]
    assert heads[0] and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
