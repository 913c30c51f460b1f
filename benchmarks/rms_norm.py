"""A frozen RMSNorm's forward and backward on the GPU: Liger's kernel (which always computes the weight's
gradient too) against torch's fused `rms_norm` (which skips it for a weight that needs none, as in LoRA), at
the 365M workload's shapes, in the same run; with each one's error against an fp32 reference.

    python benchmarks/rms_norm.py [--out FILE]   # default benchmarks/out/rms_norm-<UTC time>.json

Why: mua_cli/accel/fused.py runs torch's kernel for frozen norms, Liger's otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from gpu_speed import gpu_seconds
from record import Recording


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
    ap.add_argument("--out", help="the JSON file (default benchmarks/out/rms_norm-<UTC time>.json)")
    args = ap.parse_args()
    rec = Recording("rms_norm")
    if not torch.cuda.is_available():
        sys.exit("rms_norm.py needs a CUDA GPU")

    report = rec.doc
    report["runs"] = []
    for d in map(int, args.widths.split(",")):
        report["runs"].append(width_run(args.tokens, d))
        print(json.dumps(report["runs"][-1]), flush=True)
    print(f"wrote {rec.save(args.out)}")


if __name__ == "__main__":
    main()
