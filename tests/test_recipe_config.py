"""The recipe's typed sections: one definition per key (spec/config.py) makes the CLI flags, the checks, the
trial identity and the docs' key table."""

import pytest
import typer
import yaml
from typer.testing import CliRunner

from mua_cli.errors import MuaError
from mua_cli.spec.config import KEYS, OUTCOME_KEYS, keys_markdown
from mua_cli.spec.recipe import RECIPES_DIR, Recipe, load_recipe, recipe_from_dict
from mua_cli.ui.cli import app

DOC = RECIPES_DIR.parent / "docs" / "recipes.md"

# The identity of each shipped recipe's trials: a run folder made before a change to the recipe's code must still
# be found by the same settings afterwards (these are the values the flat Recipe of commit 0a38a08 gave).
FINGERPRINTS = {
    "tiny": "e698b01de32b7e3b",
    "tiny-cls": "7c0e5df75ddb1824",
    "qwen2.5-0.5b-instruct": "ac0f980216d683ef",
    "roberta-base-sst2": "cc79c629feab224b",
    "vit-base-beans": "657f224cee2c9842",
    "llama-3.2-1b-tulu3": "a29384799341c210",
}


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_a_shipped_recipe_keeps_its_trial_identity(name):
    assert load_recipe(name).fingerprint() == FINGERPRINTS[name]


def test_the_outcome_keys_are_every_key_but_the_sweeps():
    recipe = load_recipe("tiny")
    assert set(recipe.outcome_fields()) == set(OUTCOME_KEYS)
    assert set(KEYS) - set(OUTCOME_KEYS) == {"ranks", "regimes", "lrs", "seeds", "max_extend", "refine", "report_to"}
    # a key that only picks trials leaves the identity alone; one that changes training does not
    assert recipe.replace(ranks="4", lrs="2^-8,2^-7,2^-6", seeds=3).fingerprint() == recipe.fingerprint()
    assert recipe.replace(report_to="tensorboard,mlflow").fingerprint() == recipe.fingerprint()
    assert recipe.replace(warmup_frac=0.1).fingerprint() != recipe.fingerprint()


def test_sections_hold_the_keys_and_flat_or_nested_files_mean_the_same(tmp_path):
    flat = {"model": "embedded:tiny", "steps": 30, "seq_len": 32, "lrs": "2^-9:2^-5", "betas": [0.8, 0.99]}
    nested = {
        "model": {"name": "embedded:tiny"},
        "data": {"seq_len": 32},
        "optim": {"steps": 30, "betas": [0.8, 0.99]},
        "sweep": {"lrs": "2^-9:2^-5"},
    }
    a, b = recipe_from_dict(flat), recipe_from_dict(nested)
    assert a == b
    assert (a.optim.steps, a.data.seq_len, a.sweep.lrs, a.optim.betas) == (30, 32, "2^-9:2^-5", (0.8, 0.99))
    assert Recipe.of(**a.flat()) == a  # the flat form (recipe.yaml, a shared study) reads back the same
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump(nested))
    assert load_recipe(str(path), steps=40).optim.steps == 40  # a flag overrides a sectioned key too


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"optim": {"ranks": "4"}}, "optim: unknown key(s) ranks"),
        ({"sweep": 5}, "sweep must be a mapping"),
        ({"model": {"name": "embedded:tiny", "colour": 1}}, "model: unknown key(s) colour"),
        ({"data": {"seq_len": 1}}, "seq_len must be at least 2, not 1"),
    ],
)
def test_a_bad_section_is_one_line_naming_it(raw, message):
    with pytest.raises(MuaError, match=None) as e:
        recipe_from_dict(raw, source="r.yaml")
    assert message in str(e.value) and str(e.value).startswith("r.yaml: ")


def test_every_flagged_key_is_a_sweep_option_and_overrides_the_recipe(tmp_path, monkeypatch):
    command = typer.main.get_command(app).commands["sweep"]
    options = {o for p in command.params for o in p.opts + p.secondary_opts}
    for key, spec in KEYS.items():
        dash = "--" + key.replace("_", "-")
        assert (dash in options) == bool(spec.meta["flag"]), key
    seen = {}

    def sweep_stops_here(recipe, *args, **kwargs):
        seen["recipe"] = recipe
        raise KeyboardInterrupt  # the command's own way out: nothing runs, nothing more to check

    monkeypatch.setattr("mua_cli.api.run_sweep", sweep_stops_here)
    res = CliRunner().invoke(app, ["sweep", "--steps", "7", "--alpha0", "2", "--per-layer-lr", "--ranks", "4",
                                   "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"])  # fmt: skip
    r = seen["recipe"]
    assert (r.optim.steps, r.optim.alpha0, r.optim.per_layer_lr, r.sweep.ranks) == (7, 2.0, True, "4"), res.output
    assert r.data.seq_len == load_recipe("tiny").data.seq_len  # an unset flag leaves the recipe's key


def test_a_bad_flag_value_names_the_flag():
    res = CliRunner().invoke(app, ["sweep", "--batch-size", "0", "--device", "cpu"])
    assert res.exit_code == 2 and res.output.strip() == "error: --batch-size must be at least 1, not 0"


def test_the_docs_key_table_is_current():
    text = DOC.read_text()
    table = text.split("<!-- keys:begin -->\n", 1)[1].split("<!-- keys:end -->", 1)[0]
    assert table == keys_markdown(), "docs/recipes.md's key table is stale: paste spec.config.keys_markdown()"
