"""``qrobust export-inputs``: every input the gate feeds a pair's twin, written for a device to run.

The export is a folder: ``manifest.json``, ``inputs/<case>/batch-NNNNN.npy`` (float32, NCHW, already
preprocessed: ``(pixels - mean) / std``, exactly what the twin is fed) and ``fp32/<case>/...``, the FP32
model's logits on the same batches, computed here and kept for reference. A case is ``<perturbation>-
<level>`` (level 0 of every perturbation is one ``clean-0``). The manifest names each sample by the
SHA-256 of its bytes (qrobust.runtimes.recorded finds the device's logits by it), records the sample ids,
shapes, preprocessing, seed and thresholds, and a content hash over every input file. The perturbations
are pixel-identical on every host, so the same thresholds and seed give byte-identical input files
anywhere (the FP32 logits are this host's float arithmetic).

A device runner reads ``inputs/<case>/batch-NNNNN.npy``, writes its logits as ``<case>/batch-NNNNN.npy`` in
an output folder and copies ``manifest.json`` there; a pair with ``outputs: FOLDER`` then gates them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from qrobust import __version__
from qrobust._files import write_atomic
from qrobust.errors import ConfigError, show
from qrobust.placement import feed, stage
from qrobust.runtimes.recorded import FORMAT, MANIFEST, sample_key


def case_name(perturbation: str, level: float) -> str:
    return "clean-0" if level == 0 else f"{perturbation}-{level:g}"


def _save(path: Path, array: np.ndarray) -> bytes:
    """Write ``array`` as .npy; returns the bytes written (the same bytes for the same array on any host)."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return data


def export_inputs(thresholds: str, pair: str, output: str, *, seed: int | None = None,
                  max_samples: int | None = None) -> dict:
    """Write the export of ``pair``'s gated cases to ``output``; returns the manifest."""
    from qrobust.gate.engine import CLEAN
    from qrobust.session import Options, QrobustSession

    session = QrobustSession(Options(thresholds=thresholds, seed=seed, max_samples=max_samples))
    cases = {}
    for case in session.plan.cases + session.plan.bitwidth_cases:
        if case.pair == pair:
            cases.setdefault(case_name(case.perturbation, case.level), (CLEAN if case.level == 0 else case.perturbation,
                                                                        case.level))
    if not cases:
        raise ConfigError(f"qrobust export-inputs: pair {show(pair)} has no gated case in {thresholds} "
                          f"(gated: {', '.join(session.plan.pairs) or 'none'})")
    target = Path(output)
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"qrobust export-inputs: {show(output)} is not empty: export into a new folder (a stale "
                          "batch left there would be run on the device)")
    model = session.pairs.built(pair)
    evaluator = session.evaluator
    evaluator.add(model, probe=False)
    pre = model.preprocess
    entries, digest = [], hashlib.sha256()
    for name, (perturbation, level) in cases.items():
        batches = []
        for index, (batch, x) in enumerate(evaluator.case_batches(pair, perturbation, level)):
            file = f"{name}/batch-{index:05d}.npy"
            data = _save(target / "inputs" / file, x.detach().cpu().numpy().astype(np.float32, copy=False))
            with torch.inference_mode(), stage("export", pair):
                logits = feed(model.fp32, x, role="fp32").detach().cpu().float().numpy()
            _save(target / "fp32" / file, logits)
            sha = hashlib.sha256(data).hexdigest()
            digest.update(sha.encode())
            batches.append({"file": file, "inputs": f"inputs/{file}", "fp32": f"fp32/{file}", "sha256": sha,
                            "shape": list(x.shape), "ids": batch.ids.tolist(), "keys": [sample_key(s) for s in x]})
        entries.append({"case": name, "perturbation": perturbation if level else "clean", "level": level,
                        "batches": batches})
    manifest = {"format": FORMAT, "qrobust_version": __version__, "pair": pair, "seed": session.seed,
                "max_samples": session.max_samples, "thresholds_sha256": session.thresholds.sha256,
                "dtype": "float32", "layout": "NCHW",
                "preprocess": {"resolution": list(pre.resolution), "mean": list(pre.mean), "std": list(pre.std),
                               "input": "(pixels in [0, 1] - mean) / std"},
                "num_classes": model.num_classes, "content_sha256": digest.hexdigest(), "cases": entries}
    write_atomic(target / MANIFEST, json.dumps(manifest, indent=1))
    return manifest
