"""The benchmarks' own machinery: the GPU benchmarks' recipes still pass the recipe's checks (they run only on a
lent GPU, where a recipe that no longer validates costs a call: gpu_speed.py's did, once pretraining's steps had
to be 1 or more), what every benchmark records, the sweep timeline's arithmetic, the real-text classifier's data,
and (slow) gpu_speed.py's whole race on the CPU at its smoke size."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import cls_speed  # noqa: E402
import gpu_speed  # noqa: E402
import record  # noqa: E402
import sweep_timeline  # noqa: E402

from mua_cli.science.theory import parse_lrs  # noqa: E402


@pytest.mark.parametrize("name", sorted(gpu_speed.SHAPES))
def test_gpu_speed_recipes_validate(name):
    recipe = gpu_speed.recipe_for(name, 100)
    assert recipe.optim.steps == 100 and recipe.model.config["hidden_size"] == gpu_speed.SHAPES[name]["hidden_size"]
    assert gpu_speed.recipe_for(name, 4, smoke=True).model.config["hidden_size"] == 32


def test_recording_writes_context_and_results(tmp_path):
    rec = record.Recording("probe", argv=["benchmarks/probe.py", "--x", "1"], out_dir=tmp_path)
    rec.add("rows", {"workload": "a", "s": 1.5})
    rec.add("rows", {"workload": "b", "s": None})
    path = rec.save()
    assert path.parent == tmp_path and path.name.startswith("probe-") and path.suffix == ".json"
    doc = json.loads(path.read_text())
    assert doc["command"] == "python benchmarks/probe.py --x 1"
    assert len(doc["commit"]) == 40 and doc["from"] == "git"  # this checkout is a git work tree
    assert doc["machine"]["cpu_cores"] == os.cpu_count() and doc["versions"]["torch"]
    assert [r["workload"] for r in doc["rows"]] == ["a", "b"]
    text = record.table(doc["rows"], ["workload", "s"])
    assert text.splitlines()[2].startswith("a") and "—" in text.splitlines()[3]


def test_commit_from_the_environment_where_there_is_no_git(tmp_path, monkeypatch):
    """A lent machine gets a copy of the tree without .git: MUA_COMMIT says which commit it is, first."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not find a repo above tmp_path
    monkeypatch.delenv("MUA_COMMIT", raising=False)
    assert record.git_commit(tmp_path)["commit"] == "unknown"
    monkeypatch.setenv("MUA_COMMIT", "abc1234")
    monkeypatch.setenv("MUA_DIRTY", "1")
    assert record.git_commit(tmp_path) == {"commit": "abc1234", "dirty": True, "from": "MUA_COMMIT"}
    # a copy inside another checkout (the lent machine's copy of this repository): the variable, not that git
    assert record.git_commit(record.ROOT) == {"commit": "abc1234", "dirty": True, "from": "MUA_COMMIT"}


def _store(run_dir: Path, units: list[tuple[str, float, float, int]], t0: datetime.datetime, own=False) -> None:
    """A run folder's trial store as the sweep writes it: each unit (device, start, end, k trials) stored at its
    end, each of its k trials with wall_time = its length / k."""
    run_dir.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{run_dir / 'trials.db'}", study_name="mua")
    lr = 1e-3
    for device, start, end, k in units:
        for _ in range(k):
            lr *= 1.1
            at = t0 + datetime.timedelta(seconds=end)
            study.add_trial(optuna.trial.FrozenTrial(
                number=-1, trial_id=-1, state=optuna.trial.TrialState.COMPLETE, value=1.0, values=None,
                datetime_start=at, datetime_complete=at, params={"lr": lr},
                distributions={"lr": optuna.distributions.FloatDistribution(1e-6, 1.0, log=True)},
                user_attrs={"key": str(lr), "status": "ok", "wall_time": (end - start) / k, "device": device,
                            "info": {"batched_with": k, **({"started_at": t0.timestamp() + start - 1} if own else {})}},
                system_attrs={}, intermediate_values={},
            ))  # fmt: skip


def test_timeline_busy_and_idle_by_phase(tmp_path):
    t0 = datetime.datetime(2026, 12, 1, 12, 0, 0)
    # two GPUs: a batched group of 4 and a trial overlapping it (two slots of cuda:0), a 3 s wait, a last trial
    units = [("cuda:0", 2.0, 6.0, 4), ("cuda:0", 5.0, 7.0, 1), ("cuda:1", 3.0, 5.0, 1), ("cuda:0", 10.0, 11.0, 1)]
    _store(tmp_path / "run", units, t0)
    start = t0.timestamp()
    tl = sweep_timeline.timeline(tmp_path / "run", start=start, end=start + 12, answer=start + 15)
    assert tl["trials"] == 7 and tl["sweep_s"] == 12 and tl["answer_s"] == 15
    phases = {p["phase"]: p for p in tl["phases"]}
    assert list(phases) == ["start-up", "run 1", "wait 1", "run 2", "wind-down", "fit + transfer"]
    assert (phases["start-up"]["from_s"], phases["start-up"]["to_s"]) == (0, 2)
    assert phases["run 1"]["busy_s"] == {"cuda:0": 5.0, "cuda:1": 2.0}  # 2…7 on cuda:0: the overlap counts once
    assert phases["run 1"]["idle_s"] == {"cuda:0": 0.0, "cuda:1": 3.0}
    assert phases["run 1"]["trials_ended"] == 6
    assert phases["wait 1"]["s"] == 3 and phases["wait 1"]["busy_s"] == {"cuda:0": 0.0, "cuda:1": 0.0}
    assert phases["run 2"]["busy_s"]["cuda:0"] == 1.0 and phases["wind-down"]["s"] == 1
    assert phases["fit + transfer"]["s"] == 3
    assert tl["devices"]["cuda:0"] == {"trials": 6, "units": 3.0, "busy_s": 6.0, "idle_s": 6.0, "busy_share": 0.5}
    assert tl["idle_s_by_kind"]["wait"] == 3.0
    # a shorter split: the 3 s wait is one run with --gap 5
    assert [p["phase"] for p in sweep_timeline.timeline(tmp_path / "run", start=start, gap=5)["phases"]] == [
        "start-up", "run 1", "wind-down"]  # fmt: skip
    assert "cuda:1" in sweep_timeline.render(tl)
    # the output each phase saw, with its seconds from the start: a long phase keeps its first four and last two
    lines = [(start + 0.5, "loading")] + [(start + 11.2 + i / 100, f"trial {i}") for i in range(8)]
    out = {
        p["phase"]: p.get("output")
        for p in sweep_timeline.timeline(tmp_path / "run", start=start, end=start + 12, lines=lines)["phases"]
    }
    assert out["start-up"] == ["0.50  loading"]
    assert out["wind-down"] == ["11.20  trial 0", "11.21  trial 1", "11.22  trial 2", "11.23  trial 3",
                                "… 2 more", "11.26  trial 6", "11.27  trial 7"]  # fmt: skip


def test_docstring_texts_are_real_length_and_labelled():
    rows = cls_speed.docstring_texts()
    assert rows == cls_speed.docstring_texts()  # the same every run
    labels = {r["label"] for r in rows}
    assert len(labels) >= 8 and len(rows) >= 400
    assert all(48 <= len(r["text"].split()) <= 90 for r in rows)
    smallest = min(sum(r["label"] == x for r in rows) for x in labels)
    assert smallest >= 20  # every class has examples to learn from and hold out


def test_docstring_tokens_fall_in_64_to_128(tmp_path):
    rows = cls_speed.docstring_texts(cls_speed.PACKAGES[:3])
    tok = cls_speed.wordpiece([r["text"] for r in rows], 4000)
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = cls_speed.text_stats(tmp_path / "model", tmp_path / "d.jsonl")
    assert stats["classes"] == 3 and stats["texts"] == len(rows)
    assert 64 <= stats["tokens_p10"] and stats["tokens_p90"] <= 140 and stats["share_over_128"] < 0.25


@pytest.mark.slow
def test_gpu_speed_smoke_race_on_the_cpu(tmp_path):
    """The harness end to end at its smoke size: mua's sweep, fit and transfer, then the plain loop over the very
    trials the store holds, with the timeline and the recorded context in one JSON file."""
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--smoke", "--only",
                           "5m,minilm-text", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "gpu_speed" and doc["settings"]["smoke"] and not doc.get("errors")
    races = {r["workload"]: r for r in doc["races"]}
    assert set(races) == {"5m", "minilm-text"}
    for r in races.values():
        assert r["trials"] == 3 and r["steps"] == 4 and r["failed"] == 0
        assert r["mua_answer_s"] >= r["mua_sweep_s"] > 0 and r["plain_s"] > r["plain_trials_s"] > 0
        assert r["plain_answer_s"] == pytest.approx(r["plain_s"] + r["mua_fit_s"] + r["mua_transfer_s"], abs=0.02)
        assert r["x_answer"] == pytest.approx(r["plain_answer_s"] / r["mua_answer_s"], rel=0.01)
        assert set(r["best_lr_plain"]) == set(r["best_lr_mua"]) == {"B:1 r=4"}
        for side in ("mua", "plain"):  # the losses behind each best LR, three LRs of the smoke grid
            losses = r[f"metric_by_lr_{side}"]["B:1 r=4"]
            assert len(losses) == 3 and float(min(losses, key=losses.get)) == r[f"best_lr_{side}"]["B:1 r=4"]
        tl = r["timeline"]
        assert tl["trials"] == 3 and tl["devices"]["cpu"]["busy_s"] > 0
        assert [p["phase"] for p in tl["phases"]][0] == "start-up" and tl["phases"][-1]["phase"] == "fit + transfer"
    assert races["minilm-text"]["data"]["classes"] == 3
    assert "x_answer" in proc.stdout and str(out) in proc.stdout


def test_the_text_classifier_race_centres_its_grid_on_the_optimum_it_found():
    """minilm-text's optimum sat at 2^-12:2^-5's low edge, where `mua transfer` refuses; its grid is moved down."""
    lrs = parse_lrs(cls_speed.recipe_for("minilm-text", Path("m"), Path("d.jsonl"), 100, "16").to_dict()["lrs"])
    assert (min(lrs), max(lrs), len(lrs)) == (2**-15, 2**-8, 8)
    assert max(parse_lrs(cls_speed.recipe_for("vit-base", Path("m"), Path("d"), 100).to_dict()["lrs"])) == 2**-9


def test_timeline_takes_a_trials_own_start(tmp_path):
    """A trial that records when it started is taken at its word, not at its store time less its wall time (a
    store can lag a unit's end)."""
    t0 = datetime.datetime(2026, 12, 1, 12, 0, 0)
    _store(tmp_path / "run", [("cuda:0", 2.0, 6.0, 2)], t0, own=True)
    tl = sweep_timeline.timeline(tmp_path / "run", start=t0.timestamp())
    assert tl["source"] == "the trials' own started_at"
    assert tl["phases"][0]["to_s"] == 1  # 1 s before what its store time less its wall time says
    assert sweep_timeline.timeline(tmp_path / "run")["trials"] == 2  # the start from recipe.yaml, else the first unit


def test_a_sweep_stopped_by_a_broken_gpu_is_resumed_once_and_timed_from_its_first_start(monkeypatch, tmp_path):
    """gpu_speed.mua_answer: as the stop's message asks and a user would, the same `mua sweep` again, its time
    counted from the first command's start; any other failure of the sweep ends the race."""
    calls = []

    def command(args, env=None):
        calls.append(next(a for a in args if a in ("sweep", "fit", "transfer")))
        n = len(calls)
        if calls[-1] == "sweep" and n == 1:
            line = f"error: cuda:0: CUDA error: device-side assert triggered. {gpu_speed.BROKEN_GPU}; run it again"
            return {"start": 10.0, "end": 20.0, "rc": 2, "lines": [(19.0, line)]}
        text = '{"lr": 0.001, "basis": "study-offset"}' if calls[-1] == "transfer" else "ok"
        return {"start": 10.0 * n + 10, "end": 10.0 * n + 15, "rc": 0, "lines": [(10.0 * n + 14, text)]}

    monkeypatch.setattr(gpu_speed, "command", command)
    out = gpu_speed.mua_answer(tmp_path / "r.yaml", tmp_path / "run", "cuda:0", [])
    assert calls == ["sweep", "sweep", "fit", "transfer"]
    assert out["sweep_s"] == 25.0 and out["answer_s"] == 45.0 and out["answer_lr"] == 0.001  # from 10.0 to 35.0, 55.0
    assert len(out["resumed"]) == 1 and "device-side assert" in out["resumed"][0]
    assert len(out["sweep"]["lines"]) == 2

    calls.clear()
    monkeypatch.setattr(gpu_speed, "command", lambda args, env=None: calls.append(1) or
                        {"start": 0.0, "end": 1.0, "rc": 2, "lines": [(0.5, "error: no such recipe")]})  # fmt: skip
    with pytest.raises(RuntimeError, match="no such recipe"):
        gpu_speed.mua_answer(tmp_path / "r.yaml", tmp_path / "run", "cuda:0", [])
    assert calls == [1]


def test_scaling_table_gives_each_unit_size_its_mean_seconds_built_and_reused():
    cols = ["device", "regime", "rank", "seed", "k", "kept", "from_s", "to_s", "kept_idle", "kept_freed"]
    rows = [["cuda:0", "A:r", 4, 0, 8, 0, 0.0, 4.0, 0, 0], ["cuda:0", "A:r", 4, 0, 2, 0, 4.0, 6.0, 1, 0],
            ["cuda:0", "B:1", 4, 0, 2, 0, 4.0, 7.0, 1, 0], ["cuda:0", "A:r", 4, 1, 2, 1, 7.0, 7.5, 3, 0]]  # fmt: skip
    assert gpu_speed.unit_seconds({"each": {"columns": cols, "rows": rows}}) == "8: 4.00 / –, 2: 2.50 / 0.50"
    assert gpu_speed.unit_seconds({}) == "?"  # a timeline from before units were listed


def test_store_add_times_the_recipe_part_without_touching_the_users_hash_cache(tmp_path, monkeypatch):
    import store_add

    monkeypatch.setenv("MUA_CACHE", str(tmp_path / "mine"))
    row = store_add.recipe_part_ms(files=12, calls=2)
    assert row["data_files"] == 12 and row["identity_afresh_ms"] > 0 and row["outcome_fields_kept_ms"] > 0
    assert os.environ["MUA_CACHE"] == str(tmp_path / "mine") and not (tmp_path / "mine").exists()


def test_startup_sums_import_time_by_package():
    import startup

    own, slowest = startup.by_package("import json, email.parser")
    assert {"json", "email"} <= set(own)
    assert slowest and all("." not in name for name, _ in slowest)  # top-level packages, each with its imports
    seconds = [s for _, s in slowest]
    assert seconds == sorted(seconds, reverse=True)


def test_the_plain_loop_imports_what_a_hand_written_loop_needs_and_no_more():
    """Its process's start counts in the race: mua's store and fit (optuna, pandas) are not a plain loop's."""
    code = "import sys, plain_loop; print(sorted(m for m in sys.modules if m.split('.')[0] in {'optuna', 'pandas', 'sqlalchemy'} or m.startswith(('mua_cli.sweep', 'mua_cli.science.fit', 'mua_cli.api'))))"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == "[]"


def test_answer_commands_times_fit_and_transfer_from_each_tree_with_the_same_answer(tmp_path):
    """benchmarks/answer_commands.py end to end: a small real sweep, then `mua fit` and `mua transfer` from this
    tree and from HEAD's files, each run from outside the repository and importing the tree it was given."""
    out = tmp_path / "answer.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "answer_commands.py"), "--against", "HEAD",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(r["tree"], r["command"]): r for r in doc["rows"]}
    assert set(rows) == {(t, c) for t in ("this tree", "HEAD") for c in ("fit", "transfer")}
    assert all(r["median_s"] > 0 and len(r["each_s"]) == 1 for r in rows.values())
    assert doc["same_answer"] and float(doc["answers"]["HEAD"][0]) > 0
