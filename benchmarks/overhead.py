"""What the gate costs on top of the model work it needs.

gate: the session's Evaluator over every gated case of the built-in thresholds.yaml whose pair starts with PREFIX
(perturbations, forwards, CAMs, metrics, bootstrap; pairs already loaded).
model work: exactly the forwards and CAM passes the gate ran (read back from its cache), on the same
inputs, in a tight loop; perturbed inputs are prepared beforehand, except FGSM's, whose gradient pass
is model work and is timed. Each side is the best of two runs (the model work alone varies by ~25%
between runs on a shared 2-core machine).

Run: .venv/bin/python benchmarks/overhead.py [PREFIX ...]   (default: lenet5 efficientnet)
"""
from __future__ import annotations

import sys
import time

import torch


def _runs(evaluator, names):
    """(lead pair, group pairs, perturbation, level, {pair: cam method or None}) of every pass the gate made."""
    runs = {}
    for (name, perturbation, level), result in evaluator._cache.items():
        if name not in names:
            continue
        pair = evaluator.pairs[name]
        key = (id(pair.fp32), pair.dataset, perturbation, level)
        lead, members = runs.setdefault(key, (pair, {}))
        members[name] = evaluator.cam_methods[name] if result.cam is not None else None
    return [(lead, members, key[2], key[3]) for key, (lead, members) in runs.items()]


def model_work(evaluator, runs) -> float:
    """Seconds of the forwards and CAM passes of ``runs``, inputs prepared outside the timer."""
    from qrobust.explain.cam import compute_cams
    from qrobust.gate.engine import CLEAN
    from qrobust.data.perturbations import perturb

    total = 0.0
    for lead, members, perturbation, level in runs:
        data = evaluator.dataset(lead.dataset)
        normalize = lead.preprocess.normalize
        for batch in data.batches(evaluator.batch_size_for(lead)):
            def perturbed():
                if perturbation == CLEAN:
                    return batch.images
                return perturb(perturbation, batch.images, level, ids=batch.ids, seed=evaluator.seed,
                               boxes=batch.boxes, model=lead.fp32, normalize=normalize)
            gradient = perturbation == "fgsm"
            pixels = None if gradient else perturbed()
            start = time.perf_counter()
            if gradient:
                pixels = perturbed()
            x = normalize(pixels)
            methods = sorted({m for m in members.values() if m})
            fp = compute_cams(lead.fp32, x, lead.target_layer, methods) if methods else None
            if fp is None:
                with torch.inference_mode():
                    lead.fp32(x)
            for name, method in members.items():
                pair = evaluator.pairs[name]
                if method:
                    compute_cams(pair.quantized, x, pair.quantized_target_layer, [method], targets=fp.targets)
                else:
                    with torch.inference_mode():
                        pair.quantized(x)
            total += time.perf_counter() - start
    return total


def main(prefixes=("lenet5", "efficientnet"), repeats: int = 2) -> list[dict]:
    """Best of ``repeats`` for both sides (the gate re-evaluates from an empty cache each time)."""
    from qrobust.cli import BUILTIN_THRESHOLDS
    from qrobust.session import Options, QrobustSession

    session = QrobustSession(Options(thresholds=str(BUILTIN_THRESHOLDS)))
    evaluator = session.evaluator
    rows = []
    for prefix in prefixes:
        cases = [c for c in session.plan.cases if c.pair.startswith(prefix)]
        names = {c.pair for c in cases}
        for name in names:
            session.pair(name)
        gate, work = float("inf"), float("inf")
        for _ in range(repeats):
            evaluator._cache.clear()
            start = time.perf_counter()
            for case in cases:
                evaluator.evaluate(case.pair, case.perturbation, case.level)
            gate = min(gate, time.perf_counter() - start)
            runs = _runs(evaluator, names)
            work = min(work, model_work(evaluator, runs))
        per_batch = evaluator.forward_report()["forwards_per_perturbed_batch"]
        rows.append({"pairs": prefix, "cases": len(cases), "passes": len(runs), "gate_s": round(gate, 2),
                     "model_s": round(work, 2), "overhead": round(gate / work, 3),
                     "forwards_per_batch": {k: round(v, 3) for k, v in per_batch.items() if prefix in k}})
    return rows


if __name__ == "__main__":
    for row in main(tuple(sys.argv[1:]) or ("lenet5", "efficientnet")):
        print(f"{row['pairs']}: {row['cases']} gated cases in {row['passes']} passes; gate {row['gate_s']} s, "
              f"model work {row['model_s']} s, overhead {row['overhead']:.2f}x; forwards per perturbed batch "
              f"{row['forwards_per_batch']}")
