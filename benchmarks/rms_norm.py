"""A frozen RMSNorm's forward and backward on the GPU: Liger's kernel (which always computes the weight's
gradient too) against torch's fused `rms_norm` (which skips it for a weight that needs none, as in LoRA), at
the 365M workload's shapes, in the same run; with each one's error against an fp32 reference.

    python benchmarks/rms_norm.py [--out benchmarks/rms_norm_gpu.json]

Why: mua_cli/accel/fused.py runs torch's kernel for frozen norms, Liger's otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from gpu_speed import gpu_seconds


def width_run(tokens: int, d: int) -> dict:
    from liger_kernel.ops import LigerRMSNormFunction

    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(torch.bfloat16)  # frozen: no requires_grad
    gy = torch.randn_like(x)
    ways = {
        "liger": lambda: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False, None),
        "torch": lambda: torch.nn.functional.rms_norm(x, (d,), w, 1e-6),
    }
    xf = x.detach().float().requires_grad_()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    (ref_grad,) = torch.autograd.grad(ref, xf, gy.float())
    run = {"shape": [tokens, d]}
    for name, fwd in ways.items():
        run[f"{name}_us"] = round(1e6 * gpu_seconds(lambda fwd=fwd: fwd().backward(gy)), 1)
        x.grad = None
        fwd().backward(gy)
        run[f"{name}_grad_rel_err"] = float(f"{((x.grad.float() - ref_grad).norm() / ref_grad.norm()):.2e}")
    run["speedup"] = round(run["liger_us"] / run["torch_us"], 2)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--widths", default="1024,2048")
    ap.add_argument("--out", default=str(Path(__file__).with_name("rms_norm_gpu.json")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("rms_norm.py needs a CUDA GPU")

    report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "command": "python benchmarks/rms_norm.py " + " ".join(sys.argv[1:]),
              "runs": []}  # fmt: skip
    for d in map(int, args.widths.split(",")):
        report["runs"].append(width_run(args.tokens, d))
        print(json.dumps(report["runs"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
