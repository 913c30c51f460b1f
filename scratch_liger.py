"""Scratch (not committed): does liger-kernel (fused RMSNorm/RoPE/SwiGLU) speed a graphed step?"""
import sys, time, json, copy
sys.path.insert(0, "benchmarks")
import torch, transformers, peft
print("versions", torch.__version__, transformers.__version__, peft.__version__, flush=True)
import gpu_speed as g
from mua_cli.tasks import load_workload
from mua_cli.sweep import make_spec
from mua_cli.batched import run_batched
from mua_cli.train import run_trial

def timed(name, k, base, task, recipe, specs):
    marks = []
    t = time.perf_counter()
    clock = lambda s, v: marks.append((s, time.perf_counter(), v))
    if k == 1:
        res = [run_trial(specs[0], base, task, recipe, "cuda", clock, True, print)]
    else:
        res = run_batched(specs[:k], base, task, recipe, "cuda", clock, True, print)
    (s0, t0, _), (s1, t1, _) = marks[0], marks[-1]
    return dict(ms=round(1e3 * (t1 - t0) / (s1 - s0) / k, 2), first10=round(t0 - t, 1),
                status=[r.status for r in res], metric=[round(r.metric, 4) for r in res][:4],
                curve=[round(x, 4) for x in res[0].loss_curve[::20]], peak=round(torch.cuda.max_memory_allocated()/2**30, 1),
                err=(res[0].error or "")[:300])

for name, k, steps in (("5m", 16, 40), ("124m", 8, 40), ("350m", 1, 40)):
    recipe = g.recipe_for(name, steps)
    g.seed_cache(recipe)
    specs = [make_spec(recipe, "B:1", 16, 2.0 ** (-14 + i / 2), 0) for i in range(16)]
    work = load_workload(recipe, "cuda")
    base = work.base.cuda()
    out = {"workload": name, "k": k}
    torch.cuda.reset_peak_memory_stats()
    out["plain_hf"] = timed(name, k, base, work.task, recipe, specs)
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
        lb = copy.deepcopy(base)
        _apply_liger_kernel_to_instance(lb, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
        torch.cuda.reset_peak_memory_stats()
        out["liger"] = timed(name, k, lb, work.task, recipe, specs)
        lb2 = copy.deepcopy(base)
        # rope patched globally already; this measures norms+swiglu+rope
    except Exception as e:
        import traceback; traceback.print_exc()
        out["liger"] = repr(e)[:300]
    print(json.dumps(out), flush=True)
    del work, base
    torch.cuda.empty_cache()
