"""The transfer study's workloads (studies/workloads.yaml) are valid mua recipes, and the kept results span what
issue 26 asks of the study: six families, three tasks, steps from 100 to 1000, two batch sizes."""

import importlib.util
import json
import sys
from pathlib import Path

import yaml

STUDIES = Path(__file__).resolve().parent.parent / "studies"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"study_{name}", STUDIES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_workload_is_one_recipe_in_each_of_its_variants():
    from mua_cli.spec.recipe import recipe_from_dict

    study = _module("transfer_study")
    for w in study.load_workloads():
        base, sweeps = study.with_models(w["recipe"], "/m"), w["sweeps"]
        variants = {"run": (base, sweeps), "smoke": study.smoke(base, sweeps)}
        pbase, psweeps, facts = study.proxy_workload(base, sweeps, w["name"])
        variants["proxy"] = (pbase, psweeps)
        for kind, (b, ss) in variants.items():
            prints = {recipe_from_dict({"name": w["name"], **b, **s}).fingerprint() for s in ss}
            assert len(prints) == 1, (w["name"], kind)  # one run folder holds one set of outcome settings
        assert pbase["steps"] == max(1, base["steps"] // 4) and facts["proxy_of"] == w["name"]
        assert [s["ranks"] for s in psweeps] == ["full"]
        assert "{models}" not in json.dumps(base)


def test_the_byte_tokenizer_gives_mua_byte_ids():
    from mua_cli.train.data import byte_tokens

    tok = _module("pretrain").byte_tokenizer()
    text = "To be, or not to be — 'tis\n\tnobler ẞ"
    assert tok(text)["input_ids"] == byte_tokens(text).tolist()
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == 256


def test_the_kept_results_span_the_issues_study():
    old_families = {"embedded:tiny": "llama", "smollm2-135m": "llama", "minilm-l6": "bert"}  # metas before layers
    families, tasks, steps, batches = set(), set(), set(), set()
    for meta_path in (STUDIES / "results").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        recipe = yaml.safe_load((meta_path.parent / "recipe.yaml").read_text())
        families.add(meta.get("family") or old_families[Path(meta["model"]).name])
        tasks.add((meta["task"], recipe["data"]))
        steps.add(recipe["steps"])
        batches.add(recipe["batch_size"])
    assert len(families) >= 6 and len({t for t, _ in tasks}) >= 3
    assert min(steps) <= 100 and max(steps) >= 1000 and len(batches) >= 2
    for proxy in (STUDIES / "results" / "proxy").glob("*/meta.json"):  # each proxy's workload is kept beside it
        assert (STUDIES / "results" / json.loads(proxy.read_text())["proxy_of"] / "trials.csv").is_file()
