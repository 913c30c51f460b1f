"""The fast paths must not change the science: batched adapters and worker processes give the serial
path's trials."""

from __future__ import annotations

import math

import pytest

from mua_cli.science.theory import parse_lrs
from mua_cli.spec.recipe import load_recipe
from mua_cli.sweep.grid import make_spec
from mua_cli.sweep.sizing import Execution, units
from mua_cli.sweep.store import load_trials
from mua_cli.sweep.stream import run_sweep
from mua_cli.sweep.trainer import Trainer
from mua_cli.train.batched import run_batched
from mua_cli.train.loop import run_trial


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    import yaml
    from conftest import TINY_TEST_RECIPE

    p = tmp_path_factory.mktemp("recipe") / "micro.yaml"
    p.write_text(yaml.safe_dump(TINY_TEST_RECIPE))
    return load_recipe(str(p))


@pytest.mark.parametrize("regime,rank", [("A:r", 8), ("B:1", 2)])
def test_batched_trials_match_serial(micro, regime, rank):
    micro = micro.replace(divergence_factor=1.05)  # so that the highest LR stops early
    runner = Trainer.load(micro, "cpu")
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
    micro = micro.replace(ranks="2,8", lrs="2^-8:2^-4", max_extend=0)
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
    from mua_cli.sweep.sizing import slots_per_gpu, trials_per_pass

    gpu = Execution("cuda")
    assert trials_per_pass(gpu, micro, 365e6) == 16  # 128 tokens per trial: even a large model takes 16
    big = micro.replace(batch_size=16, seq_len=512)  # 8192 tokens per trial
    assert [trials_per_pass(gpu, big, n) for n in (5e6, 120e6, 365e6)] == [16, 8, 1]
    assert trials_per_pass(Execution("cpu"), micro, 5e6) == 1  # no gain on the CPU
    assert trials_per_pass(Execution("cuda", batch_trials=3), big, 365e6) == 3
    # two threads share a GPU below 300M parameters when steps are CUDA graphs; eager steps: more, processes
    assert [slots_per_gpu(gpu, n) for n in (5e6, 120e6, 365e6)] == [2, 2, 1]
    eager = Execution("cuda", cuda_graphs=False)
    assert [slots_per_gpu(eager, n) for n in (5e6, 120e6, 365e6)] == [4, 2, 1]
    assert slots_per_gpu(Execution("cuda", workers_per_gpu=3), 5e6) == 3


class FakeRunner:
    """A runner that loads nothing: it records what ran where, and in what order runners were made and closed."""

    n_params = 5_000_000
    made: list = []
    closed: list = []
    broken: set = set()  # devices whose runner cannot be made

    notes: tuple = ()

    def __init__(self, device, on_note):
        self.device, self.ran, self.on_note, self.on_step = device, [], on_note, None
        self.warm = None
        self.made.append(self)

    def keep_warm(self, slots, k, shared=None):
        # a new object for each call without `shared`; an empty shared cache is still the one (trainer.keep_warm)
        self.warm = shared if shared is not None else [f"kept units on {self.device}"]
        return self.warm

    def size_kept(self, slots, k): ...

    @classmethod
    def load(cls, recipe, device, on_note=None, graphs=True, fused=True):
        if device in cls.broken:
            raise OSError("no such model")
        return cls(device, on_note)

    def run_unit(self, unit, on_step=None, on_note=None):
        self.on_step = on_step  # in a pool's slot: where a Ctrl-C stops it
        import time

        from mua_cli.spec.trial import TrialResult

        time.sleep(0.05)  # so that every slot gets a turn
        self.ran.append(unit)
        return [TrialResult("ok", 1.0, device=self.device) for _ in unit]

    def close(self):
        self.closed.append(self)

    def memory(self, rank):
        from mua_cli.sweep.memory import TrialMemory

        return TrialMemory(base=2**20, fixed=2**20, per_trial=2**20, parts={"activations": 2**20})


def _pool(recipe, ex, listener, devices):
    """A pool as slots.start makes one: its first trainer loaded before it starts."""
    from mua_cli.sweep.pool import Pool

    first = FakeRunner.load(recipe, devices[0], listener.note)
    first.keep_warm(1, 1)
    return Pool.start(recipe, ex, listener, devices, first)


def _all(pool, specs):
    """Every trial submitted at once, and each result as it comes."""
    pool.submit(specs)
    return [pool.next() for _ in specs]


@pytest.fixture
def fake_gpus(monkeypatch):
    """Trainer replaced by FakeRunner, and the CUDA calls a slot's thread makes recorded."""
    from types import SimpleNamespace

    import torch

    FakeRunner.made, FakeRunner.closed, FakeRunner.broken = [], [], set()
    monkeypatch.setattr("mua_cli.sweep.pool.Trainer", FakeRunner)
    monkeypatch.setattr("mua_cli.sweep.slots.Trainer", FakeRunner)
    monkeypatch.setattr("mua_cli.sweep.memory.usable_bytes", lambda device: 80 * 2**30)  # every plan fits
    calls = SimpleNamespace(device=[], stream=[], synced=[])
    monkeypatch.setattr(torch.cuda, "set_device", calls.device.append)
    monkeypatch.setattr(
        torch.cuda, "default_stream", lambda d: SimpleNamespace(synchronize=lambda: calls.synced.append(d))
    )
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: f"stream on {device}")
    monkeypatch.setattr(torch.cuda, "set_stream", calls.stream.append)
    return calls


def test_graphed_pool_runs_one_thread_per_gpu(micro, fake_gpus):
    """With CUDA graphs every slot is a thread of this process on its own GPU; a GPU whose model cannot load
    takes no units, and the models are closed in the reverse of the order they were made."""
    from types import SimpleNamespace

    from mua_cli.sweep.grid import plan

    FakeRunner.broken = {"cuda:2"}
    notes: list[str] = []
    gpus = ["cuda:0", "cuda:1", "cuda:2"]
    pool = _pool(micro, Execution("cuda", workers_per_gpu=1), SimpleNamespace(note=notes.append), gpus)
    assert pool.procs == [] and "3 slot(s), threads of this process" in notes[-1]
    specs = plan(micro)
    ran = [(spec.key, result.device) for spec, result in _all(pool, specs)]
    assert sorted(k for k, _ in ran) == sorted(s.key for s in specs)
    assert {d for _, d in ran} == {"cuda:0", "cuda:1"}  # both loaded GPUs took units
    assert "cuda:2 could not load the workload: OSError: no such model" in notes
    assert sorted(fake_gpus.device) == gpus and fake_gpus.stream == []  # one GPU per slot: default streams
    pool.close()
    assert FakeRunner.closed == FakeRunner.made[::-1] and len(FakeRunner.made) == 2
    with pytest.raises(KeyboardInterrupt):  # closed: a unit still running would stop at its next step check
        FakeRunner.made[1].on_step(20, 1.0)


def test_slots_that_share_a_gpu_step_on_their_own_streams(micro, fake_gpus):
    from types import SimpleNamespace

    from mua_cli.sweep.grid import plan

    pool = _pool(micro, Execution("cuda", workers_per_gpu=2), SimpleNamespace(note=print), ["cuda:0"])
    assert len(pool.slots) == 2 and pool.procs == []
    assert len(_all(pool, plan(micro))) == len(plan(micro))
    pool.close()
    assert fake_gpus.stream == ["stream on cuda:0"] * 2 and fake_gpus.synced == ["cuda:0"] * 2


def test_a_slot_that_fails_stops_the_sweep_with_its_error(micro, fake_gpus, monkeypatch):
    from types import SimpleNamespace

    from mua_cli.sweep.grid import plan

    def broken(self, unit, on_step=None, on_note=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(FakeRunner, "run_unit", broken)
    pool = _pool(micro, Execution("cuda"), SimpleNamespace(note=print), ["cuda:0", "cuda:1"])
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _all(pool, plan(micro))
    pool.close(interrupted=True)
    assert FakeRunner.closed == FakeRunner.made[::-1] and len(FakeRunner.made) == 4  # two slots per GPU
    by_gpu = {}
    for r in FakeRunner.made:  # the slots of one GPU keep built units in one place (train/warm.py)
        by_gpu.setdefault(r.device, set()).add(id(r.warm))
    assert sorted(by_gpu) == ["cuda:0", "cuda:1"] and all(len(ids) == 1 for ids in by_gpu.values())
    assert len(set().union(*by_gpu.values())) == 2


def test_eager_pool_runs_units_in_this_process_too(micro, fake_gpus, monkeypatch):
    """Without graphs this process runs the first slot and starts worker processes for the others without
    waiting for them, taking units from the queue as they do: with workers that never take one, it runs them
    all."""
    import queue
    from types import SimpleNamespace

    import torch

    from mua_cli.sweep.grid import plan

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

        def terminate(self): ...

    ctx = SimpleNamespace(Queue=queue.Queue, Process=Process)
    monkeypatch.setattr(torch.multiprocessing, "get_context", lambda kind: ctx)
    notes: list[str] = []
    eager = Execution("cuda", workers_per_gpu=1, cuda_graphs=False)
    pool = _pool(micro, eager, SimpleNamespace(note=notes.append), ["cuda:0", "cuda:1", "cuda:2"])
    assert [s.device for s in pool.slots] == ["cuda:0"] and started == ["cuda:1", "cuda:2"]
    assert "this process and 2 slot process(es)" in notes[-1]
    specs = plan(micro)
    pool.results.put(("error", "cuda:2", "OSError: no such model"))  # a worker that could not load
    ran = [spec.key for spec, result in _all(pool, specs)]
    assert sorted(ran) == sorted(s.key for s in specs) and len(FakeRunner.made[0].ran) >= 3  # units ≥ slots
    assert "cuda:2 could not load the workload: OSError: no such model" in notes
    assert fake_gpus.device == ["cuda:0"]
    pool.close()
    assert FakeRunner.closed == FakeRunner.made
    assert pool.tasks.qsize() == 2  # a stop sign per worker left (this process's thread took its own)

    FakeRunner.made, FakeRunner.closed = [], []

    def cannot_start(self):
        raise OSError("cannot fork")

    monkeypatch.setattr(Process, "start", cannot_start)
    with pytest.raises(OSError, match="cannot fork"):  # a worker that cannot start: this process's model goes
        _pool(micro, eager, SimpleNamespace(note=notes.append), ["cuda:0", "cuda:1"])
    assert len(FakeRunner.made) == 1 and FakeRunner.closed == FakeRunner.made


@pytest.mark.parametrize("gpus,n_params,slots", [(1, 5e6, 2), (1, 365e6, 1), (2, 365e6, 2), (2, 5e6, 4)])
def test_executor_picks_the_slots_by_gpus_and_model_size(micro, fake_gpus, monkeypatch, gpus, n_params, slots):
    """One slot in all runs in the main thread (with per-step progress); more make a pool of threads."""
    from types import SimpleNamespace

    import torch

    from mua_cli.sweep.pool import Pool
    from mua_cli.sweep.slots import Inline, start

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(FakeRunner, "n_params", n_params)
    listener = SimpleNamespace(note=lambda m: None, step=lambda step, loss: None)
    run = start(micro, Execution("cuda"), listener)
    try:
        if slots == 1:
            assert isinstance(run, Inline) and run.trainer.device == "cuda:0"
        else:
            assert isinstance(run, Pool) and len(run.slots) == slots and run.procs == []
            assert run.trainers[0] is FakeRunner.made[0]  # the first model, made before the choice
    finally:
        run.close()
    assert FakeRunner.closed == FakeRunner.made[::-1]
    assert isinstance(start(micro, Execution("cpu"), listener), Inline)
