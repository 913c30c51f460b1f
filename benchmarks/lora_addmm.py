"""LoRA's scale-and-add folded into its second matmul (mua_cli/accel/lora_addmm.py) against peft's own forward: ms
per training step (forward, backward, AdamW) of LoRA trials, both ways, in the same run, on this machine's
device, and the ratio.

    python benchmarks/lora_addmm.py [--device cpu|cuda] [--runs tiny:1,tiny:8,wide:1] [--out FILE.json] [--gpu-form]

"peft" and "folded": an fp32 base under autocast (the fold's first form, which the CPU runs). With
--gpu-form (the default on a CUDA device) also "peft_bf16" and "mua_gpu": a bf16 base, peft's layers against
the ones mua runs on a GPU (lora_gpu.py: whole-layer functions, grouped q/k/v and gate/up, the cast buffer).

Workloads (name:K, K LoRA trials per pass, rank 16, regime B:1): the embedded default's model (width 128, 2
layers, batch 8 × 64) and a wider one (width 512, 4 layers, batch 8 × 256; wide:8 takes ~13 s a step on two
CPU cores). Steps are eager (a CUDA graph would replay the same kernels); the median step after 3 warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from record import Recording  # noqa: E402

from mua_cli.accel.lora_addmm import fold_lora_adds  # noqa: E402
from mua_cli.accel.lora_gpu import precast_adapters  # noqa: E402
from mua_cli.spec.recipe import Recipe  # noqa: E402
from mua_cli.spec.trial import TrialSpec  # noqa: E402
from mua_cli.train.adapters import prepare  # noqa: E402
from mua_cli.train.stacked import build  # noqa: E402

SHAPES = {  # name: (hidden, intermediate, layers, heads, batch, seq)
    "tiny": (128, 344, 2, 4, 8, 64),
    "wide": (512, 1536, 4, 8, 8, 256),
}


def step_ms(model, x, device: str, steps: int, bf16: bool) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    cuda = device.startswith("cuda")
    kind = "cuda" if cuda else "cpu"
    times = []
    for i in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=cuda or bf16):
            loss = model(input_ids=x[:, :-1], use_cache=False).logits.float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:  # after warm-up
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]  # the median: robust to a shared machine's hiccups


def run(name: str, k: int, device: str, steps: int, gpu_form: bool) -> dict:
    hidden, inter, layers, heads, batch, seq = SHAPES[name]
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device)
    base.requires_grad_(False)
    recipe = Recipe.of(name="bench", model="embedded:tiny", ranks="16", regimes="B:1")
    spec = TrialSpec("B:1", 16, 1e-3, 0)
    x = torch.randint(0, 256, (batch * k, seq + 1), device=device)
    out = {"workload": name, "trials_per_pass": k}
    base16 = copy.deepcopy(base).to(torch.bfloat16)
    # fp32 base under autocast: the first form of the fold; bf16 base: mua's GPU layers (lora_gpu.py) as
    # run_trial sets them up (whole-layer functions, q/k/v and gate/up grouped, the cast buffer)
    for tag in ("peft", "folded", *(("peft_bf16", "mua_gpu") if gpu_form else ())):
        b = base16 if tag in ("peft_bf16", "mua_gpu") else base
        if k == 1:
            model = prepare(b, "B:1", 16, 1.0, "all-linear", 0)
        else:
            model, _, _ = build(b, spec, recipe.replace(targets="all-linear"), k)
        model.to(device).train()
        if tag in ("folded", "mua_gpu"):
            fold_lora_adds(model, whole_layer=tag == "mua_gpu")
        if tag == "mua_gpu":
            precast_adapters(model)
        out[f"{tag}_ms"] = round(step_ms(model, x, device, steps, b is base16), 2)
    out["ratio"] = round(out["peft_ms"] / out["folded_ms"], 3)
    if gpu_form:
        out["ratio_gpu_form"] = round(out["peft_bf16_ms"] / out["mua_gpu_ms"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=23)
    ap.add_argument("--runs", default="tiny:1,tiny:8,wide:1")
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/lora_addmm-<UTC time>.json)")
    ap.add_argument("--gpu-form", action=argparse.BooleanOptionalAction, default=None,
                    help="also peft and mua's GPU layers on a bf16 base (default: on a CUDA device)")  # fmt: skip
    args = ap.parse_args()
    rec = Recording("lora_addmm")
    gpu_form = args.device.startswith("cuda") if args.gpu_form is None else args.gpu_form
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",")]
    rows = [run(name, k, args.device, args.steps, gpu_form) for name, k in runs]
    for r in rows:
        print(json.dumps(r), flush=True)
    rec.doc.update({"device": args.device, "threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
