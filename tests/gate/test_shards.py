"""A gate split across jobs (--qrobust-shard K/N, qrobust merge): states that fold exactly, and three
jobs merged into the records of one job."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from qrobust.gate.engine import SHARD_SAMPLES, shard_layout
from qrobust.metrics.classification import PairMetrics
from qrobust.metrics.saliency import CamAgreement
from qrobust.metrics.stats import BootstrapTrimmedMean, poisson_weights


def _batches(n=300, k=12, size=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fp = torch.randn(n, k, generator=gen) * 3
    q = fp + torch.randn(n, k, generator=gen) * 0.7
    q[7] = float("nan")  # a non-finite twin output, kept in the first ids
    labels = torch.randint(0, k, (n,), generator=gen)
    ids = torch.arange(n)
    for start in range(0, n, size):
        s = slice(start, start + size)
        yield fp[s], q[s], labels[s], ids[s], ids[s] // 3


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _shards(batches, per_shard=2):
    batches = list(batches)
    return [batches[i:i + per_shard] for i in range(0, len(batches), per_shard)]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert (x.value == y.value) or (x.value != x.value and y.value != y.value), name
        assert x.interval == y.interval, name
        assert x.n == y.n, name


def test_metrics_fold_exactly_through_their_written_state():
    """One process folding its shards and merge folding the same shards read back from disk hold equal
    states: every estimate, interval and kept sample is the same to the bit."""
    shards = _shards(_batches())
    in_memory, from_disk = PairMetrics(12, 0, 200), PairMetrics(12, 0, 200)
    for part in shards:
        state = PairMetrics(12, 0, 200)
        for batch in part:
            state.update(*batch)
        in_memory.merge(state)
        from_disk.merge(PairMetrics.from_state(_roundtrip(state.state())))
    _same(in_memory.results(), from_disk.results())
    assert in_memory.flipped == from_disk.flipped and in_memory.first_kl == from_disk.first_kl
    assert in_memory.nonfinite_ids == from_disk.nonfinite_ids == [7]


def test_folded_shards_hold_what_one_pass_holds():
    """Counts, per-class bootstrap counts and kept samples are what one pass over all batches keeps; the
    float means agree to rounding (they are summed once per shard)."""
    one = PairMetrics(12, 0, 200)
    for batch in _batches():
        one.update(*batch)
    folded = PairMetrics(12, 0, 200)
    for part in _shards(_batches()):
        state = PairMetrics(12, 0, 200)
        for batch in part:
            state.update(*batch)
        folded.merge(state)
    assert folded.n == one.n == 299 and folded.counts == one.counts
    for model in ("fp", "q"):
        for name in ("tp", "fp", "fn"):
            assert torch.equal(folded.boot_counts[model][name], one.boot_counts[model][name])
    assert folded.flipped == one.flipped and folded.first_kl == one.first_kl and folded.kl_max == one.kl_max
    assert torch.equal(folded.kl_hist.counts, one.kl_hist.counts)
    a, b = one.results(), folded.results()
    for name in a:
        assert b[name].value == pytest.approx(a[name].value, rel=1e-12, abs=1e-15, nan_ok=True), name


def test_sparse_state_of_a_thousand_classes_is_small():
    state = PairMetrics(1000, 0, 1000)
    for fp, q, labels, ids, groups in _batches(n=64, k=1000, size=64):
        state.update(fp, q, labels, ids, groups)
    written = _roundtrip(state.state())
    size = sum(t.numel() * t.element_size() for _, t in written["boot"].values())
    assert size < 4 * 64 * 1000 * 8  # at most the classes seen, not 6 x 1000 x 1000 doubles
    assert torch.equal(PairMetrics.from_state(written).boot_counts["q"]["fn"], state.boot_counts["q"]["fn"])


def test_cam_agreement_and_trimmed_mean_fold_exactly():
    gen = torch.Generator().manual_seed(3)
    maps = [(torch.rand(10, 7, 7, generator=gen), torch.zeros(10, dtype=torch.bool)) for _ in range(4)]
    pixels = torch.rand(10, 3, 7, 7, generator=gen)
    ids = [torch.arange(i * 10, i * 10 + 10) for i in range(2)]
    one = CamAgreement("eigencam", replicates=100, capacity=3)
    parts = []
    for i in range(2):
        w = poisson_weights(0, ids[i], 100)
        top1 = (torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long))
        one.update(maps[2 * i], maps[2 * i + 1], ids[i], w, pixels, top1=top1)
        part = CamAgreement("eigencam", replicates=100, capacity=3)
        part.update(maps[2 * i], maps[2 * i + 1], ids[i], w, pixels, top1=top1)
        parts.append(CamAgreement.from_state(_roundtrip(part.state())))
    folded = CamAgreement("eigencam", replicates=100, capacity=3)
    for part in parts:
        folded.merge(part)
    assert folded.most_different == one.most_different and folded.degenerate == one.degenerate
    assert [o["id"] for o in folded.overlays] == [o["id"] for o in one.overlays]
    assert folded.overlays[0]["top1"] == [0, 1]
    a, b = one.results(), folded.results()
    _same({"cam_kld": a["cam_kld"]}, {"cam_kld": b["cam_kld"]})  # the trimmed mean keeps its samples: exact
    for name in ("cam_rmse", "cam_sim", "cam_cc"):
        assert b[name].value == pytest.approx(a[name].value, rel=1e-12)
    spent = BootstrapTrimmedMean(10)
    spent.update(torch.ones(3), torch.ones(10, 3))
    spent.estimate()
    with pytest.raises(ValueError, match="released by its estimate"):
        spent.merge(BootstrapTrimmedMean(10))


def test_shard_layout_is_fixed_by_samples_and_batch_size():
    assert shard_layout(450, 64) == (SHARD_SAMPLES // 64, 4)
    assert shard_layout(49, 8) == (16, 1)
    assert shard_layout(1, 500) == (1, 1)


# ---- three jobs against one, with the README's CI commands ------------------------------------------------
PAIR = "lenet5-digits-int8-x86"
TIMED = ("speedup", "cam_speedup")  # wall-clock timings: measured anew by any run


def ci_examples() -> tuple[dict, dict]:
    """The README's GitHub Actions and GitLab CI examples (the YAML blocks that name their file first)."""
    import yaml

    from helpers import readme_blocks

    found = {block.splitlines()[0]: yaml.safe_load(block) for block in readme_blocks("yaml") if block.startswith("# .")}
    return found["# .github/workflows/gate.yml"], found["# .gitlab-ci.yml"]


def _commands(steps, **values):
    """The qrobust command lines of a CI job, with the CI system's variables filled in."""
    lines = [step.get("run") if isinstance(step, dict) else step for step in steps]
    lines = [line for line in lines if isinstance(line, str) and line.startswith("qrobust ")]
    for name, value in values.items():
        lines = [line.replace(name, str(value)) for line in lines]
    return [line.split() for line in lines]


def _gate(folder, args, extra=()):
    """A CI command as the job runs it, on the LeNet int8 pair at 300 samples (through the options'
    environment variables, so the README's lines run unchanged)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QROBUST_", "PYTEST_"))}
    env.update(QROBUST_PAIRS=PAIR, QROBUST_MAX_SAMPLES="300")
    return subprocess.run([sys.executable, "-m", "qrobust", *args[1:], "-q", "-p", "no:randomly", *extra], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One job, and the GitHub example's three matrix jobs (job 1 on two xdist workers), each in its own
    folder, their state folders then laid out as download-artifact leaves them."""
    from qrobust.suites import BUILTIN_THRESHOLDS

    github, _ = ci_examples()
    root = tmp_path_factory.mktemp("shards")
    for folder in ("one", "job1", "job2", "job3"):
        (root / folder).mkdir()
        shutil.copy(BUILTIN_THRESHOLDS, root / folder / "my-gate.yaml")
    steps = github["jobs"]["gate"]["steps"]
    one = _gate(root / "one", ["qrobust", "run", "my-gate.yaml", "--qrobust-report=report"])
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    for k in (1, 2, 3):
        command, = _commands(steps, **{"${{ matrix.shard }}": k})
        job = _gate(root / f"job{k}", command, ["-n", "2"] if k == 1 else [])
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        assert f"qrobust shard {k}/3:" in job.stdout
        shutil.copytree(root / f"job{k}" / "report" / f"qrobust-shard-{k}-of-3",  # as upload/download-artifact do
                        root / "shards" / f"shard-{k}" / f"qrobust-shard-{k}-of-3")
    return root


def _records(path):
    return {(c["test"], c["metric"]): c for c in json.loads(path.read_text())["cases"]}


@pytest.mark.slow
def test_three_jobs_merge_into_the_records_of_one(runs, capsys, monkeypatch):
    from qrobust.cli import main

    states = sorted(p.name for p in (runs / "shards" / "shard-1" / "qrobust-shard-1-of-3").glob("states-*.pt"))
    assert states == ["states-gw0.pt", "states-gw1.pt"]  # the controller evaluates nothing under -n
    github, _ = ci_examples()
    command, = _commands(github["jobs"]["verdict"]["steps"])
    assert command[:3] == ["qrobust", "merge", "shards/*"]
    monkeypatch.chdir(runs)
    jobs = sorted(str(p.relative_to(runs)) for p in (runs / "shards").glob("*"))  # the shell's glob
    assert main(["merge", *jobs, *command[3:]]) == 0
    assert "qrobust gate: PASSED" in capsys.readouterr().out
    one, merged = _records(runs / "one" / "report" / "report.json"), _records(runs / "qrobust-report" / "report.json")
    assert one.keys() == merged.keys() and len(one) > 500
    differing = [key for key, record in one.items() if key[1] not in TIMED and record != merged[key]]
    assert differing == []
    assert all(record["n"] == 300 for key, record in merged.items() if "test_metric" in key[0])
    html = (runs / "qrobust-report" / "report.html").read_text()
    assert html.count("data:image/png") >= 3  # the CAM overlays, drawn from the merged states


def test_the_gitlab_example_runs_the_same_commands():
    """GitLab's parallel: jobs run the GitHub matrix's command, and the verdict job merges the folder
    their artifacts land in (a report folder holding every job's state)."""
    github, gitlab = ci_examples()
    matrix, = _commands(github["jobs"]["gate"]["steps"], **{"${{ matrix.shard }}": 2})
    parallel, = _commands(gitlab["gate"]["script"], **{"$CI_NODE_INDEX": 2, "$CI_NODE_TOTAL": gitlab["gate"]["parallel"]})
    assert parallel == matrix
    merge_line, = _commands(gitlab["verdict"]["script"])
    assert merge_line == ["qrobust", "merge", "report", "--report", "qrobust-report"]


@pytest.mark.slow
@pytest.mark.parametrize("mistake, expected", [
    ("missing", "job(s) 2 of 3 missing"),
    ("twice", "job 1 of 3 given twice"),
    ("lost shard", "are in no job's state"),
    ("duplicated shard", "is in both"),
    ("pickle", "unreadable state"),
    ("not a job", "holds no job.json"),
    ("other thresholds", "is not the thresholds file the jobs ran with"),
    ("other seed", "ran with seed 5"),
])
def test_merge_refuses_what_is_not_one_run(runs, tmp_path, capsys, mistake, expected):
    from qrobust.cli import main

    jobs = []
    for k in (1, 2, 3):
        shutil.copytree(runs / "shards" / f"shard-{k}", tmp_path / f"job{k}")
        jobs.append(str(tmp_path / f"job{k}"))
    state = tmp_path / "job2" / "qrobust-shard-2-of-3" / "states-controller.pt"
    job3 = tmp_path / "job3" / "qrobust-shard-3-of-3" / "job.json"
    args = list(jobs)
    if mistake == "missing":
        args = [jobs[0], jobs[2]]
    elif mistake == "twice":
        args = [jobs[0], jobs[0], jobs[1], jobs[2]]
    elif mistake == "lost shard":
        state.unlink()
    elif mistake == "duplicated shard":
        shutil.copy(state, tmp_path / "job3" / "qrobust-shard-3-of-3" / "states-extra.pt")
    elif mistake == "pickle":
        class Boom:
            def __reduce__(self):
                return (os.system, ("echo should-not-run",))

        state.write_bytes(pickle.dumps({"format": 1, "cases": [Boom()]}))
    elif mistake == "not a job":
        args = [jobs[0], jobs[1], str(tmp_path)]
    elif mistake == "other seed":
        document = json.loads(job3.read_text())
        job3.write_text(json.dumps({**document, "seed": 5}))
    elif mistake == "other thresholds":  # all three jobs agree, but not with the file here
        for k in (1, 2, 3):
            path = tmp_path / f"job{k}" / f"qrobust-shard-{k}-of-3" / "job.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "thresholds_sha256": "0" * 64}))
    code = main(["merge", *args, "--report", str(tmp_path / "merged")])
    err = capsys.readouterr()
    assert code == 4
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("qrobust merge:"), err.err
    assert "should-not-run" not in err.out + err.err
    assert not (tmp_path / "merged" / "report.json").exists()


@pytest.mark.slow
def test_a_job_run_again_replaces_its_state(runs, tmp_path):
    """A stale state in a job's folder would be merged as the new run's: the job clears its folder first."""
    shutil.copytree(runs / "job3", tmp_path / "job3")
    stale = tmp_path / "job3" / "report" / "qrobust-shard-3-of-3" / "states-gw7.pt"
    shutil.copy(stale.with_name("states-controller.pt"), stale)
    job = _gate(tmp_path / "job3", ["qrobust", "run", "my-gate.yaml", "--qrobust-shard=3/3", "--qrobust-report=report",
                                    "-k", "awgn"])
    assert job.returncode == 0, job.stdout[-2000:]
    assert not stale.exists() and stale.with_name("job.json").exists()
