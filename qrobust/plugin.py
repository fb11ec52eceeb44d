"""qrobust's pytest plugin: options, one session object, fixtures, case parametrization, report.

Import-light on purpose (it loads in every pytest run of an environment with qrobust installed): torch
and the models are imported only when a gate actually runs. Modelled on pytest-benchmark: options in
one group with ini and environment fallbacks, the work in a session object, results travelling to the
xdist controller as test-report properties, the report written once by the controller.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

# name -> (help, environment variable, default)
OPTIONS = {
    "thresholds": ("thresholds YAML to gate with (default: thresholds.yaml at the rootdir, when present)",
                   "QROBUST_THRESHOLDS", None),
    "pairs": ("comma-separated pair names to gate (default: every pair in the thresholds' gate)", "QROBUST_PAIRS",
              None),
    "device": ("torch device for FP32 and fake-quant models; real int8 pairs need cpu", "QROBUST_DEVICE", "cpu"),
    "seed": ("seed of perturbations and bootstrap (default: the thresholds' seed)", "QROBUST_SEED", None),
    "report": ("directory for report.json and report.html", "QROBUST_REPORT", "qrobust-report"),
    "decision": ("point | strict | lenient (default: the thresholds' decision)", "QROBUST_DECISION", None),
    "max-samples": ("cap every dataset at N samples, a seeded subsample (a quick profile)", "QROBUST_MAX_SAMPLES",
                    None),
    "save-baseline": ("save every case's values to this JSON file after the run", "QROBUST_SAVE_BASELINE", None),
    "baseline": ("compare every case with this saved baseline; a regression beyond its margin fails",
                 "QROBUST_BASELINE", None),
}
FLAGS = {
    "overwrite-baseline": "allow --qrobust-save-baseline to replace an existing file",
    "baseline-any-env": "compare with a baseline recorded in a different environment (torch, CPU, weights)",
}
SESSION_KEY = pytest.StashKey["QrobustSession | None"]()
CASE_PROPERTY = "qrobust_case"


def pytest_addoption(parser):
    group = parser.getgroup("qrobust", "qrobust: robustness gate for quantized models")
    for name, (help_text, env, default) in OPTIONS.items():
        dest = "qrobust_" + name.replace("-", "_")
        group.addoption(f"--qrobust-{name}", dest=dest, default=None, metavar=name.split("-")[-1].upper(),
                        help=f"{help_text}. Env {env}; ini {dest}.")
        parser.addini(dest, help=help_text, default=default)
    for name, help_text in FLAGS.items():
        group.addoption(f"--qrobust-{name}", dest="qrobust_" + name.replace("-", "_"), action="store_true",
                        default=False, help=help_text)


def option(config, name: str):
    """Command line, then environment, then ini, then the default."""
    dest = "qrobust_" + name.replace("-", "_")
    value = config.getoption(dest)
    if value in (None, ""):
        value = os.environ.get(OPTIONS[name][1]) or config.getini(dest)
    return value if value not in ("", None) else OPTIONS[name][2]


def _int_option(config, name: str):
    value = option(config, name)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"--qrobust-{name}: expected a whole number, got {value!r}") from None
    if number < (0 if name == "seed" else 1):
        raise pytest.UsageError(f"--qrobust-{name}: must be >= {0 if name == 'seed' else 1}, got {number}")
    return number


def pytest_configure(config):
    config.addinivalue_line("markers", "qrobust_tolerance(**metrics): override tolerances for this test, e.g. "
                                       "@pytest.mark.qrobust_tolerance(top1_delta=0.02)")
    config.addinivalue_line("markers", "qrobust: a qrobust gate check (added automatically)")
    config.addinivalue_line("markers", "qrobust_metrics(*names): the metrics this gate test checks; cases whose "
                                       "pair gates none of them are not generated")
    path = option(config, "thresholds")
    explicit = path is not None
    if not explicit:
        default = Path(str(config.rootpath)) / "thresholds.yaml"
        path = str(default) if default.exists() else None
    if path is None:
        config.stash[SESSION_KEY] = None
        return
    if explicit and not Path(path).is_absolute():
        path = str(Path(config.invocation_params.dir) / path)
    from qrobust.errors import ConfigError, InvalidArgument
    from qrobust.session import QrobustSession

    decision = option(config, "decision")
    if decision is not None and decision not in ("point", "strict", "lenient"):
        raise pytest.UsageError(f"--qrobust-decision: must be point, strict or lenient, got {decision!r}")
    try:
        config.stash[SESSION_KEY] = QrobustSession(
            path, pairs=option(config, "pairs"), device=option(config, "device"), seed=_int_option(config, "seed"),
            decision=decision, max_samples=_int_option(config, "max-samples"),
            save_baseline=option(config, "save-baseline"), overwrite_baseline=config.getoption("qrobust_overwrite_baseline"),
            baseline=option(config, "baseline"), baseline_any_env=config.getoption("qrobust_baseline_any_env"),
            worker=hasattr(config, "workerinput"))
    except (ConfigError, InvalidArgument) as exc:
        raise pytest.UsageError(str(exc)) from None
    config.pluginmanager.register(_Collector(), COLLECTOR)
    if hasattr(config, "workerinput"):  # share the cores between xdist workers instead of oversubscribing
        import torch

        workers = int(config.workerinput.get("workercount", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    else:
        config.stash[SESSION_KEY].progress = TerminalProgress(config)


class TerminalProgress:
    """Batch progress of a long case, drawn after pytest's own line on an interactive terminal.

    Output capture is suspended for each draw (as pytest does for pdb); nothing is drawn when stdout is
    not a terminal (CI logs), for single-batch cases, or more often than every 0.2 s, and the line is
    restored when the case ends.
    """

    def __init__(self, config):
        self._capman = config.pluginmanager.getplugin("capturemanager")
        self._drawn = False
        self._last = 0.0

    def __call__(self, label: str, done: int, total: int) -> None:
        import contextlib
        import time

        now = time.monotonic()
        if total < 2 or (done < total and now - self._last < 0.2):
            return
        self._last = now
        uncaptured = self._capman.global_and_fixture_disabled() if self._capman else contextlib.nullcontext()
        with uncaptured:
            if not sys.stdout.isatty():
                return
            if not self._drawn:
                sys.stdout.write("\x1b7")  # save the cursor where pytest left it
                self._drawn = True
            sys.stdout.write("\x1b8\x1b[K")  # back there, clear the rest of the line
            if done < total:
                sys.stdout.write(f" [qrobust {label}: batch {done}/{total}]"[:max(0, shutil.get_terminal_size().columns - 40)])
            else:
                self._drawn = False
            sys.stdout.flush()


def _session(config):
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        raise pytest.UsageError("qrobust: no thresholds file: pass --qrobust-thresholds PATH or create "
                                "thresholds.yaml at the rootdir")
    return session


def pytest_generate_tests(metafunc):
    for fixture, kind in (("qrobust_case", "gate"), ("qrobust_bitwidth_case", "bitwidth"),
                          ("qrobust_latency_pair", "latency"), ("qrobust_explanation_pair", "explanations")):
        if fixture in metafunc.fixturenames:
            session = _session(metafunc.config)
            if kind in ("latency", "explanations"):
                pairs = session.latency_pairs if kind == "latency" else session.explanation_pairs
                metafunc.parametrize(fixture, pairs, ids=str)
                continue
            cases = session.cases if kind == "gate" else session.bitwidth_cases
            declared = metafunc.definition.get_closest_marker("qrobust_metrics")
            if declared is not None:  # a pair restricted to other metrics (gate.<pair>.metrics) gets no test here
                cases = [c for c in cases if set(declared.args) & set(c.tolerances)]
            params = [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
                      for c in cases]
            metafunc.parametrize(fixture, params)


GATE_FIXTURES = {"qrobust_check", "qrobust_case", "qrobust_bitwidth_case", "qrobust_latency_pair",
                 "qrobust_explanation_pair"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if GATE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("qrobust")


@pytest.fixture(scope="session")
def qrobust(request):
    """The session object: thresholds, loaded pairs (each once), the evaluator and the recorded checks."""
    return _session(request.config)


@pytest.fixture
def qrobust_check(request, qrobust):
    """``qrobust_check(case, metric_or_metrics)``: evaluate (once per session), decide, record, fail with
    the numbers of every violated metric."""

    def check(case, metrics):
        return qrobust.check(case, metrics, request.node)

    return check


@pytest.fixture(scope="session")
def qrobust_evaluator(qrobust):
    """The session's Evaluator, for users writing their own gate tests on the same cached cases."""
    return qrobust.evaluator


class _Collector:
    """Controller-side plugin: gathers checks from test reports (local or from xdist workers)."""

    def __init__(self):
        self.records: list[dict] = []
        self.gate_reports = 0
        self.worker_outputs: list[dict] = []

    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        if "qrobust" in report.keywords:
            self.gate_reports += 1
        for name, value in report.user_properties:
            if name != CASE_PROPERTY:
                continue
            record = json.loads(value)
            if getattr(report, "wasxfail", None) is not None and report.skipped:
                record["verdict"] = "xfail"
            elif report.failed and "XPASS(strict)" in str(report.longrepr):  # a strict xfail that passed
                record["verdict"] = "fail"
                record["note"] = "XPASS(strict): a known-bad configuration was not caught"
            self.records.append(record)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        output = getattr(node, "workeroutput", {}).get("qrobust")
        if output:
            self.worker_outputs.append(json.loads(output))


COLLECTOR = "qrobust-collector"


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    qsession = config.stash.get(SESSION_KEY, None)
    if qsession is None:
        return
    if hasattr(config, "workerinput"):
        config.workeroutput["qrobust"] = json.dumps(qsession.worker_output())
        return
    collector = config.pluginmanager.get_plugin(COLLECTOR)
    if collector.gate_reports == 0 and not collector.records:
        return
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        qsession.problems.append("run interrupted: report not written, the previous report is left intact")
        qsession.summary_lines = []
        return
    outputs = [qsession.worker_output()] + collector.worker_outputs
    judged = [r for r in collector.records if r["verdict"] != "xfail"]
    try:
        qsession.finish(collector.records, outputs, option(config, "report"))
    except Exception as exc:  # a report that cannot be written must fail the run, visibly
        qsession.problems.append(f"report: {exc}")
    if not judged:
        qsession.problems.append(f"{collector.gate_reports} gate tests ran but none produced a verdict "
                                 "(all skipped?): a gate that checks nothing does not pass")
    if qsession.problems and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    qsession = config.stash.get(SESSION_KEY, None)
    if qsession is None or hasattr(config, "workerinput") or qsession.summary_lines is None:
        return
    terminalreporter.section("qrobust")
    for line in qsession.summary_lines:
        terminalreporter.write_line(line)
    for problem in qsession.problems:
        terminalreporter.write_line(f"qrobust: FAILED: {problem}", red=True)
