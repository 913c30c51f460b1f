"""The fast paths must not change the science: batched adapters and worker processes give the serial
path's trials."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mua_cli.batched import run_batched
from mua_cli.execute import Execution, units
from mua_cli.recipe import load_recipe
from mua_cli.runner import TrialRunner
from mua_cli.store import load_trials
from mua_cli.sweep import make_spec, run_sweep
from mua_cli.theory import parse_lrs
from mua_cli.train import run_trial


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    import yaml
    from conftest import TINY_TEST_RECIPE

    p = tmp_path_factory.mktemp("recipe") / "micro.yaml"
    p.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    return load_recipe(str(p))


@pytest.mark.parametrize("regime,rank", [("A:r", 8), ("B:1", 2)])
def test_batched_trials_match_serial(micro, regime, rank):
    micro = dataclasses.replace(micro, divergence_factor=1.05)  # so that the highest LR stops early
    runner = TrialRunner(micro, "cpu")
    lrs = [2.0**-9, 2.0**-6, 2.0**-3, 2.0**7]  # the last diverges: the batch must stop it without harm
    specs = [make_spec(micro, regime, rank, lr, 0) for lr in lrs]
    serial = [run_trial(s, runner.base, runner.data, micro, "cpu") for s in specs]
    batched = run_batched(specs, runner.base, runner.data, micro, "cpu")
    assert [r.status for r in batched] == [r.status for r in serial]
    assert serial[-1].status == "diverged"
    for a, b in zip(serial, batched, strict=True):
        assert len(a.loss_curve) == len(b.loss_curve)
        assert b.loss_curve == pytest.approx(a.loss_curve, rel=1e-4, abs=1e-4)
        if a.status == "ok":
            assert b.metric == pytest.approx(a.metric, rel=1e-4)
            assert b.eval_loss == pytest.approx(a.eval_loss, rel=1e-4)
        else:
            assert math.isinf(b.metric)


def test_units_group_same_rank_and_seed_and_balance(micro):
    specs = [make_spec(micro, reg, r, lr, 0) for reg, r in [("A:r", 2), ("B:1", 8)] for lr in parse_lrs("2^-9:2^-2")]
    specs.append(make_spec(micro, "full", 0, 1e-3, 0))
    got = units(specs, micro, 6)
    sizes = sorted(len(u) for u in got)
    assert sizes == [1, 4, 4, 4, 4]  # 8 LRs per group in two balanced units; full finetuning alone
    for u in got:
        assert len({(s.regime, s.rank, s.seed) for s in u}) == 1
    assert units(specs, micro, 1) == [[s] for s in specs]


def test_sweeps_agree_batched_pooled_and_serial(micro, tmp_path):
    """The same sweep three ways (serial; batched; two worker processes): every trial's metric agrees."""
    micro = dataclasses.replace(micro, ranks="2,8", lrs="2^-8:2^-4", max_extend=0)
    runs = {
        "serial": Execution("cpu", 1, 1),
        "batched": Execution("cpu", 1, 5),
        "pool": Execution("cpu", 2, 1),
    }
    metrics = {}
    for name, ex in runs.items():
        run_sweep(micro, tmp_path / name, "cpu", execution=ex)
        df = load_trials(tmp_path / name).sort_values(["regime", "rank", "lr"])
        metrics[name] = df
    ref = metrics["serial"]
    assert len(ref) == 2 * 2 * 5
    for name in ("batched", "pool"):
        df = metrics[name]
        assert list(df["status"]) == list(ref["status"])
        assert list(df["key"]) == list(ref["key"])
        ok = ref["status"] == "ok"
        assert df["metric"][ok].to_numpy() == pytest.approx(ref["metric"][ok].to_numpy(), rel=1e-4)


def test_execution_defaults_follow_the_measured_rules(micro):
    from mua_cli.execute import trials_per_pass, workers_per_gpu

    gpu = Execution("cuda")
    assert trials_per_pass(gpu, micro, 365e6) == 16  # 128 tokens per trial: even a large model takes 16
    big = dataclasses.replace(micro, batch_size=16, seq_len=512)  # 8192 tokens per trial
    assert [trials_per_pass(gpu, big, n) for n in (5e6, 120e6, 365e6)] == [16, 8, 1]
    assert trials_per_pass(Execution("cpu"), micro, 5e6) == 1  # no gain on the CPU
    assert trials_per_pass(Execution("cuda", batch_trials=3), big, 365e6) == 3
    # one process per GPU when steps are CUDA graphs; eager steps share a GPU among several
    assert [workers_per_gpu(gpu, n) for n in (5e6, 120e6, 365e6)] == [1, 1, 1]
    eager = Execution("cuda", cuda_graphs=False)
    assert [workers_per_gpu(eager, n) for n in (5e6, 120e6, 365e6)] == [4, 2, 1]
    assert workers_per_gpu(Execution("cuda", workers_per_gpu=3), 5e6) == 3


def test_pool_runs_units_in_this_process_too(micro, monkeypatch):
    """This process loads the model for the first slot, starts workers for the others without waiting for
    them, and takes units from the queue as they do: with workers that never take one, it runs them all."""
    import queue
    from types import SimpleNamespace

    import torch

    import mua_cli.runner as runner_module
    from mua_cli.errors import MuaError
    from mua_cli.execute import PoolExecutor
    from mua_cli.sweep import plan
    from mua_cli.trial import TrialResult

    started: list[str] = []

    class Process:  # a worker that starts and never takes a unit
        exitcode = None

        def __init__(self, target, args, daemon):
            self.device = args[1]

        def start(self):
            started.append(self.device)

        def join(self, timeout=None): ...

        def is_alive(self):
            return False

    class Runner:
        n_params = 5_000_000

        def __init__(self, recipe, device, listener, graphs, fused):
            self.device, self.ran, self.closed = device, [], False
            self.step = listener.step  # where the pool stops its own slot, not a progress display

        def run_unit(self, unit):
            self.ran.append(unit)
            return [TrialResult("ok", 1.0) for _ in unit]

        def close(self):
            self.closed = True

    ctx = SimpleNamespace(Queue=queue.Queue, Process=Process)
    monkeypatch.setattr(torch.multiprocessing, "get_context", lambda kind: ctx)
    monkeypatch.setattr(runner_module, "TrialRunner", Runner)
    thread_devices: list[str] = []  # the slot's thread sets its GPU: the current device is per thread
    monkeypatch.setattr(torch.cuda, "set_device", thread_devices.append)
    notes: list[str] = []
    pool = PoolExecutor(micro, Execution("cuda"), SimpleNamespace(note=notes.append), ["cuda:0", "cuda:1", "cuda:2"])
    assert pool.local.device == "cuda:0" and started == ["cuda:1", "cuda:2"]
    assert "this one and 2 worker process(es)" in notes[-1]
    specs = plan(micro)
    pool.results.put(("error", "cuda:2", "OSError: no such model"))  # a worker that could not load
    ran = [spec.key for spec, result in pool.run(specs)]
    assert sorted(ran) == sorted(s.key for s in specs) and len(pool.local.ran) >= 3  # no fewer units than slots
    assert "worker on cuda:2 could not load the workload: OSError: no such model" in notes
    assert set(thread_devices) == {"cuda:0"}
    pool.local.step(10, 1.0)  # running: nothing happens
    pool.close()
    assert pool.local.closed and pool.tasks.qsize() == 2  # one stop sign per worker
    with pytest.raises(KeyboardInterrupt):  # closed: a unit still running would stop at its next step check
        pool.local.step(20, 1.0)

    made: list[Runner] = []
    monkeypatch.setattr(runner_module, "TrialRunner", lambda *a: made.append(Runner(*a)) or made[-1])

    def cannot_start(self):
        raise OSError("cannot fork")

    monkeypatch.setattr(Process, "start", cannot_start)
    with pytest.raises(OSError, match="cannot fork"):  # a worker that cannot start: this process's model goes
        PoolExecutor(micro, Execution("cuda"), SimpleNamespace(note=notes.append), ["cuda:0", "cuda:1"])
    assert len(made) == 1 and made[0].closed
    monkeypatch.setattr(Process, "start", lambda self: started.append(self.device))

    pool = PoolExecutor(micro, Execution("cuda"), SimpleNamespace(note=notes.append), ["cuda:0", "cuda:1"])
    pool.procs[0].exitcode = 1  # a worker that died
    with pytest.raises(MuaError, match="a worker process died"):
        list(pool.run(specs))
