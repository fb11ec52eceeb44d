"""The host matrix: the built-in gate under every CPU variant this machine can emulate, record by record.

CI runners differ in their CPU (AVX2, AVX-512 with or without VNNI or AMX), thread count and pytest. A
gate whose verdict moves with the runner is a flaky test. Each variant here switches one of the kernels
that differ between runners and reruns the gate; its report.json is diffed against this host's:

* ``ATEN_CPU_CAPABILITY=default`` / ``avx2``: ATen's vector width (FP32 and fake-quant models, metrics);
* ``ONEDNN_MAX_CPU_ISA=SSE41``: oneDNN's FP32 convolutions (and the onednn engine's int8 kernels);
* ``--qrobust-x86-kernels onednn``: the x86 engine's int8 convolutions on oneDNN, as on AVX512-VNNI CPUs
  (``fbgemm``: as on the others);
* ``OMP_NUM_THREADS=1``: one thread;
* the oldest supported pytest (``--old-pytest DIR``: a ``pip install --target DIR pytest==7.4.4
  pytest-benchmark==4.0.0`` overlay).

Run: .venv/bin/python benchmarks/host_matrix.py [--pairs A,B] [--variants NAME,...] [--old-pytest DIR]
     [--reference REPORT] [--keep DIR]
Exit status 1 when any verdict differs from this host's or a record is missing from either (values may
differ: the table counts them and names the largest difference).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from gate_run import gate_report  # noqa: E402

VARIANTS = {
    "ATEN_CPU_CAPABILITY=default": ({"ATEN_CPU_CAPABILITY": "default"}, []),
    "ATEN_CPU_CAPABILITY=avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, []),
    "ONEDNN_MAX_CPU_ISA=SSE41": ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, []),
    "x86 convs on onednn (AVX512-VNNI path)": ({}, ["--qrobust-x86-kernels", "onednn"]),
    "x86 convs on fbgemm": ({}, ["--qrobust-x86-kernels", "fbgemm"]),
    "OMP_NUM_THREADS=1": ({"OMP_NUM_THREADS": "1"}, []),
}
OLD_PYTEST = "oldest pytest"
# the cheapest variant that runs another kernel path for both kinds of twin: CI runs it on the LeNet pairs
CHEAPEST = {"ATEN default + x86 convs on onednn": ({"ATEN_CPU_CAPABILITY": "default"},
                                                   ["--qrobust-x86-kernels", "onednn"])}


def records(report: dict) -> dict[tuple, dict]:
    """A report's checks by (pair, perturbation, level, metric, test), the test's node id without its
    folder: ``make suite`` collects ``suites/test_gate.py`` in the clone, ``qrobust run`` the installed
    ``test_gate.py``, and both are the same check."""
    return {(c["pair"], c["perturbation"], c["level"], c["metric"], node_in_file(c["test"])): c for c in report["cases"]}


def node_in_file(node_id: str) -> str:
    """``suites/test_gate.py::test_metric[...]`` -> ``test_gate.py::test_metric[...]``."""
    path, separator, name = node_id.partition("::")
    return Path(path).name + separator + name


def compare(reference: dict, other: dict) -> dict:
    """A variant's report against the reference: records compared, verdict differences, and value
    differences (the largest absolute one and its record; timings, measured but never gated, are left
    out: no two runs time alike), and records only one of them has."""
    ref, new = records(reference), records(other)
    shared = ref.keys() & new.keys()
    verdicts = sorted(k for k in shared if ref[k]["verdict"] != new[k]["verdict"])
    values = [k for k in shared if ref[k]["value"] != new[k]["value"] and ref[k]["verdict"] != "measured"]
    moved = [(abs(new[k]["value"] - ref[k]["value"]), k) for k in values
             if ref[k]["value"] is not None and new[k]["value"] is not None]
    largest, where = max(moved, default=(0.0, None))
    return {"records": len(shared), "verdicts": verdicts, "values": len(values), "largest": largest, "where": where,
            "unmatched": len(ref.keys() ^ new.keys())}


def describe(found: dict) -> str:
    """The largest value difference as a table cell: its size, metric, pair and case."""
    if found["where"] is None:
        return "—"
    pair, perturbation, level, metric, _ = found["where"]
    return f"{found['largest']:.2g} ({metric}, {pair} {perturbation} {level:g})"


def run(name: str, env: dict, args: list[str], pairs: str | None, folder: Path) -> tuple[dict, float]:
    report_dir = folder / name.replace(" ", "_").replace("/", "_")
    select = ["--qrobust-pairs", pairs] if pairs else []
    start = time.perf_counter()
    report, _ = gate_report([*select, *args, "--qrobust-report", str(report_dir)], cwd=folder,
                            env={**os.environ, **env}, report_dir=report_dir, label=name)
    return report, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", help="gate only these pairs (default: the whole built-in gate)")
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join([*VARIANTS, OLD_PYTEST])}, or cheapest")
    parser.add_argument("--old-pytest", metavar="DIR", help="a pip --target overlay holding the oldest supported pytest")
    parser.add_argument("--reference", metavar="REPORT", help="this host's report.json (default: run it here)")
    parser.add_argument("--keep", metavar="DIR", help="keep the variants' reports here")
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    if args.old_pytest:
        variants[OLD_PYTEST] = ({"PYTHONPATH": os.pathsep.join(filter(None, [args.old_pytest,
                                                                             os.environ.get("PYTHONPATH")]))}, [])
    if args.variants == "cheapest":
        variants = CHEAPEST
    elif args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            parser.error(f"unknown variant {unknown[0]!r} (known: {', '.join(variants)})")
        variants = {v: variants[v] for v in wanted}
    folder = Path(args.keep or tempfile.mkdtemp(prefix="qrobust-hosts-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.reference:
        import json

        reference, seconds = json.loads(Path(args.reference).read_text()), 0.0
        if args.pairs:
            keep = set(args.pairs.split(","))
            reference = {**reference, "cases": [c for c in reference["cases"] if c["pair"] in keep]}
    else:
        reference, seconds = run("this host", {}, [], args.pairs, folder)
    features = reference["environment"].get("cpu_features") or {}
    print(f"# host matrix: {len(reference['cases'])} checks per run; this host {reference['environment']['cpu_capability']}, "
          f"AVX512-VNNI {features.get('avx512_vnni')}, {os.cpu_count()} cores, reports in {folder}")
    print("| variant | wall s | records compared | verdicts differing | values differing | largest difference |")
    print("|---|---|---|---|---|---|")
    print(f"| this host | {seconds:.0f} | {len(reference['cases'])} | — | — | — |")
    failed = False
    for name, (env, extra) in variants.items():
        report, seconds = run(name, env, extra, args.pairs, folder)
        found = compare(reference, report)
        failed |= bool(found["verdicts"]) or found["unmatched"] > 0
        print(f"| {name} | {seconds:.0f} | {found['records']} | **{len(found['verdicts'])}** | {found['values']} | "
              f"{describe(found)} |" + (f" unmatched records: {found['unmatched']}" if found["unmatched"] else ""))
        for key in found["verdicts"][:10]:
            print(f"  verdict differs: {' / '.join(map(str, key[:4]))}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
