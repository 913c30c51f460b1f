"""Step time and GPU memory of the real-model recipes' trials, on models of the recipes' exact shapes.

The hubs cannot be reached from the GPU machine, so each model is built from its architecture's config with random
weights (the step time does not depend on the weights) and fed synthetic tokens or images of the recipe's batch
and sequence length. Each trial runs through mua's own `run_trial` (bf16 frozen base, fp32 trainable weights under
bf16 autocast, AdamW). Prints a table and writes benchmarks/recipe_steps.json (or --out), which docs/recipes.md
quotes.

    python benchmarks/recipe_steps.py [--steps 40] [--only qwen2.5-0.5b-instruct,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from record import Recording  # noqa: E402

from mua_cli.science.theory import parse_lrs  # noqa: E402
from mua_cli.spec.recipe import load_recipe  # noqa: E402
from mua_cli.spec.trial import TrialSpec  # noqa: E402
from mua_cli.train.data import TokenData  # noqa: E402
from mua_cli.train.loop import run_trial  # noqa: E402
from mua_cli.train.sources import Records  # noqa: E402
from mua_cli.train.tasks import ImageClsTask, LMTask, TextClsTask  # noqa: E402


def qwen_0_5b():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def llama_1b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=5e5,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def roberta_base():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    return RobertaForSequenceClassification(cfg)


def vit_base():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(num_labels=3))


MODELS = {
    "qwen2.5-0.5b-instruct": qwen_0_5b,
    "llama-3.2-1b-tulu3": llama_1b,
    "roberta-base-sst2": roberta_base,
    "vit-base-beans": vit_base,
}
KINDS = [("B:1", 16), ("A:r", 64), ("full", 0)]


def synthetic_task(recipe, model):
    g = torch.Generator().manual_seed(0)
    if recipe.model.task == "causal-lm":
        vocab = model.config.vocab_size
        n = recipe.optim.batch_size * (recipe.data.seq_len + 1) * 50
        return LMTask(TokenData(torch.randint(0, vocab, (n,), generator=g), torch.randint(0, vocab, (n // 10,)),
                                recipe.data.seq_len))  # fmt: skip
    if recipe.model.task == "seq-cls":
        n = recipe.optim.batch_size * 20
        lengths = torch.randint(recipe.data.seq_len // 4, recipe.data.seq_len + 1, (n,), generator=g).tolist()
        ids = [torch.randint(3, 50000, (k,), generator=g).tolist() for k in lengths]
        labels = torch.randint(0, 2, (n,), generator=g).tolist()
        # one padded width, as a GPU sweep's text batches have (train/workload.py): the step can be a CUDA graph
        return TextClsTask(ids, labels, ["neg", "pos"], 1, n - recipe.optim.batch_size, fixed=True)
    import numpy as np
    from PIL import Image

    n = recipe.optim.batch_size * 4
    rng = np.random.default_rng(0)
    rows = [{"image": Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))} for _ in range(n)]
    labels = [i % 3 for i in range(n)]
    return ImageClsTask(Records("synthetic", rows=rows), "image", list(range(n)), labels, ["a", "b", "c"],
                        n - recipe.optim.batch_size, None, 224, 3)  # fmt: skip


def measure(name: str, steps: int) -> list[dict]:
    recipe = load_recipe(name, steps=steps, divergence_factor=1e9)  # random data: time it, do not stop it
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = MODELS[name]().to(torch.bfloat16).eval()
    base.requires_grad_(False)
    build_s = time.perf_counter() - t0
    task = synthetic_task(recipe, base)
    run_trial(TrialSpec("B:1", 16, 2.0**-14, 0, key="warmup"), base, task, recipe, "cuda")  # kernels, shapes
    rows = []
    for regime, rank in KINDS:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        stamps: list[tuple[int, float]] = []  # (step, time) at each of the loop's checks (every CHECK_EVERY steps)

        def on_step(step, loss, stamps=stamps):
            torch.cuda.synchronize()
            stamps.append((step, time.perf_counter()))

        spec = TrialSpec(regime, rank, 2.0**-14, 0, key="benchmark")
        result = run_trial(spec, base, task, recipe, "cuda", on_step)
        timed = stamps[1:]  # from the second check on: the eager warm-up steps and the capture are behind
        ms = 1000 * (timed[-1][1] - timed[0][1]) / (timed[-1][0] - timed[0][0]) if len(timed) >= 2 else math.nan
        row = {
            "recipe": name,
            "trial": "full-ft" if regime == "full" else f"{regime} r={rank}",
            "status": result.status,
            "ms_per_step": round(ms, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            "trainable_params": result.info.get("trainable_params"),
            "trial_wall_s": round(result.wall_time, 1),
            "batch": f"{recipe.optim.batch_size} x {recipe.data.seq_len}"
            if recipe.model.task != "image-cls"
            else recipe.optim.batch_size,
            "error": result.error.splitlines()[0] if result.error else "",
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    n_trials = (2 * 3 + 1) * len(parse_lrs(recipe.sweep.lrs))
    steps = load_recipe(name).optim.steps  # the recipe's own, not the few timed here
    mean_ms = sum(r["ms_per_step"] for r in rows) / len(rows)
    rows.append({"recipe": name, "trial": "sweep estimate", "model_build_s": round(build_s, 1),
                 "trials": n_trials, "steps": steps,
                 "hours": round(n_trials * steps * mean_ms / 3.6e6, 2)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", default=",".join(MODELS))
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/recipe_steps-<UTC time>.json)")
    args = ap.parse_args()
    rec = Recording("recipe_steps")
    if not torch.cuda.is_available():
        sys.exit("recipe_steps needs a CUDA GPU")
    out = rec.doc
    out.update({"steps_timed": args.steps, "rows": []})
    for name in args.only.split(","):
        out["rows"].extend(measure(name, args.steps))
    print(f"\n{'recipe':24} {'trial':16} {'ms/step':>8} {'peak GiB':>9} {'trainable':>12}")
    for r in out["rows"]:
        if "ms_per_step" in r:
            n = r["trainable_params"] or 0
            print(f"{r['recipe']:24} {r['trial']:16} {r['ms_per_step']:>8} {r['peak_gib']:>9} {n:>12,}")
        else:
            print(f"{r['recipe']:24} {'sweep estimate':16} {r['trials']} trials x {r['steps']} steps ≈ {r['hours']} h")
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
