"""A gate split across CI jobs: ``--qrobust-shard K/N`` runs job K's share of every case, and
``qrobust merge`` (``qrobust.merge``) judges the whole gate from the jobs' states, into the verdicts and
report.json one job would write. Here: the state files, their checks, and the fold.

Every case's samples are cut into shards of ``engine.SHARD_SAMPLES`` (whole batches) whatever the machine,
and every run folds its shards' streaming states in shard order (``PairMetrics.merge``,
``CamAgreement.merge``): one job folds the shards it evaluates, merge folds the shards of N jobs, and the
sums are the same floating-point sums. Job K evaluates shards i with i % N == K - 1, and runs the
whole-pair tests (latency, explanations, quantizer properties) of every N-th pair.

A job writes ``<report>/qrobust-shard-K-of-N/``: ``job.json`` (the run's settings, the pending checks with
the tolerance each test applies, the finished records of whole-pair tests) and one ``states-<process>.pt``
per process (the controller, each xdist worker): plain tensors, read back with
``torch.load(weights_only=True)``, so a state file cannot run code. The CI system's job matrix is the
distributed engine: there is no scheduler here.

"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qrobust._files import write_atomic
from qrobust.errors import ConfigError, show

FORMAT = 1
JOB_FILE = "job.json"
SETTINGS = ("thresholds_sha256", "seed", "decision", "max_samples", "pairs", "device", "x86_kernels", "qrobust_version")


def folder(report_dir: str | Path, shard: tuple[int, int]) -> Path:
    """Where job K of N writes its state, inside its report folder."""
    return Path(report_dir) / f"qrobust-shard-{shard[0]}-of-{shard[1]}"


def clear(path: Path) -> None:
    """An empty state folder for a new run of the job (a stale state would be merged as this run's)."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("states-*.pt"), path / JOB_FILE]:
        stale.unlink(missing_ok=True)


def write_states(path: Path, process: str, evaluator) -> None:
    """This process's shard states, by case and shard index."""
    import torch

    cases = [{"pair": pair, "perturbation": perturbation, "level": level,
              "shards": evaluator.shard_counts[(pair, perturbation, level)], "states": states}
             for (pair, perturbation, level), states in evaluator.shard_states.items()]
    cases += [{"pair": pair, "perturbation": perturbation, "level": level, "shards": count, "states": {}}
              for (pair, perturbation, level), count in evaluator.shard_counts.items()
              if (pair, perturbation, level) not in evaluator.shard_states]
    path.mkdir(parents=True, exist_ok=True)
    partial = path / f".states-{process}.pt.partial"
    torch.save({"format": FORMAT, "cases": cases}, partial)
    partial.replace(path / f"states-{process}.pt")


def write_job(path: Path, settings: dict, pending: list[dict], records: list[dict], outputs: list[dict],
              gate_tests: int) -> Path:
    job = {"format": FORMAT, **settings, "gate_tests": gate_tests, "pending": pending, "records": records,
           "outputs": [{**out, "overlays": []} for out in outputs]}  # overlays are drawn from the merged states
    target = path / JOB_FILE
    write_atomic(target, json.dumps(job, indent=1, sort_keys=True))
    return target


@dataclass
class Job:
    path: Path
    document: dict
    states: list[tuple[Path, dict]]

    @property
    def shard(self) -> tuple[int, int]:
        return tuple(self.document["shard"])


def job_folders(given: str) -> list[Path]:
    """The job state folders a user named: a state folder itself, its job.json, or a folder holding state
    folders (a report folder, or the folder CI artifacts were downloaded into)."""
    path = Path(given)
    if path.is_file() and path.name == JOB_FILE:
        return [path.parent]
    if (path / JOB_FILE).is_file():
        return [path]
    inside = sorted(path.glob(f"qrobust-shard-*/{JOB_FILE}")) if path.is_dir() else []
    if not inside:
        what = "does not exist" if not path.exists() else f"holds no {JOB_FILE} (write one with pytest --qrobust-shard K/N)"
        raise ConfigError(f"qrobust merge: {show(given)} {what}")
    return [p.parent for p in inside]


def load_job(path: Path) -> Job:
    import torch

    try:
        document = json.loads((path / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"qrobust merge: {show(str(path / JOB_FILE))}: not a job state ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(f"qrobust merge: {show(str(path / JOB_FILE))}: not a job state of format {FORMAT} "
                          f"(found {show(document.get('format') if isinstance(document, dict) else type(document).__name__)})")
    states = []
    for file in sorted(path.glob("states-*.pt")):
        try:
            content = torch.load(file, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is one line naming the file
            raise ConfigError(f"qrobust merge: {show(str(file))}: unreadable state ({type(exc).__name__}: "
                              f"{show(str(exc), 120)})") from None
        if not isinstance(content, dict) or content.get("format") != FORMAT:
            raise ConfigError(f"qrobust merge: {show(str(file))}: not a shard state of format {FORMAT}")
        states.append((file, content))
    return Job(path, document, states)


def check_jobs(jobs: list[Job]) -> None:
    """All N jobs of one gate, each once, with the same settings: else one line naming the job."""
    if not jobs:
        raise ConfigError("qrobust merge: no job states given")
    first = jobs[0]
    n = first.shard[1]
    for job in jobs[1:]:
        if job.shard[1] != n:
            raise ConfigError(f"qrobust merge: {show(str(job.path))} is job {job.shard[0]} of {job.shard[1]}, "
                              f"{show(str(first.path))} one of {n}: merge the jobs of one run")
        for key in SETTINGS:
            if job.document.get(key) != first.document.get(key):
                raise ConfigError(f"qrobust merge: {show(str(job.path))} ran with {key} "
                                  f"{show(job.document.get(key))}, {show(str(first.path))} with "
                                  f"{show(first.document.get(key))}: merge the jobs of one run")
    seen: dict[int, Job] = {}
    for job in jobs:
        if job.shard[0] in seen:
            raise ConfigError(f"qrobust merge: job {job.shard[0]} of {n} given twice ({show(str(seen[job.shard[0]].path))}"
                              f", {show(str(job.path))})")
        seen[job.shard[0]] = job
    missing = sorted(set(range(1, n + 1)) - set(seen))
    if missing:
        raise ConfigError(f"qrobust merge: job(s) {', '.join(map(str, missing))} of {n} missing: every job's state "
                          "is needed to judge the gate")


def merged_results(jobs: list[Job]) -> dict[tuple[str, str, float], object]:
    """Every evaluated case's result, its shards folded in order from all jobs' states."""
    from qrobust.gate.engine import case_result, fold, read_states
    from qrobust.metrics.classification import PairMetrics
    from qrobust.metrics.saliency import CamAgreement

    shards: dict[tuple, dict[int, tuple[Path, dict]]] = {}
    counts: dict[tuple, tuple[int, Path]] = {}
    for job in jobs:
        for file, content in job.states:
            for case in content["cases"]:
                key = (case["pair"], case["perturbation"], float(case["level"]))
                count = counts.setdefault(key, (case["shards"], file))
                if count[0] != case["shards"]:
                    raise ConfigError(f"qrobust merge: {show(str(file))}: {key[0]} / {key[1]} @ {key[2]:g} has "
                                      f"{case['shards']} shards, {show(str(count[1]))} says {count[0]}")
                for index, state in case["states"].items():
                    if index in shards.setdefault(key, {}):
                        raise ConfigError(f"qrobust merge: shard {index} of {key[0]} / {key[1]} @ {key[2]:g} is in "
                                          f"both {show(str(shards[key][index][0]))} and {show(str(file))}")
                    shards[key][index] = (file, state)
    results = {}
    for key, (count, _) in counts.items():
        found = shards.get(key, {})
        missing = sorted(set(range(count)) - set(found))
        if missing:
            raise ConfigError(f"qrobust merge: {key[0]} / {key[1]} @ {key[2]:g}: shard(s) {missing[:5]} of {count} "
                              "are in no job's state (a job crashed or its states were not kept)")
        config = found[0][1]  # the fold starts from empty states of the same configuration, as a job's does
        total = {key[0]: (PairMetrics(*config["metrics"]["config"]),
                          CamAgreement(*config["cam"]["config"]) if config["cam"] is not None else None)}
        fold(read_states({index: {key[0]: state} for index, (_, state) in found.items()}), total)
        results[key] = case_result(*key, *total[key[0]])
    return results
