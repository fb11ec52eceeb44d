"""qrobust's pytest plugin: options, markers, the session object, fixtures, case parametrization, report.

Import-light on purpose (it loads in every pytest run of an environment with qrobust installed): torch
and the models are imported only when a gate actually runs. Modelled on pytest-benchmark: options in
one group parsed at the boundary (argparse ``type=``; the environment and ini fallbacks go through the
same parsers), markers validated at collection, the work in a session object, results travelling to the
xdist controller as test-report properties, the report written once by the controller.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from qrobust import _options as opts

SESSION_KEY = pytest.StashKey["object"]()
CASE_PROPERTY = "qrobust_case"  # a check's record, on its test report (how records reach the controller)
DIAGNOSIS_PROPERTY = "qrobust_diagnosis"  # a failing case's per-layer diagnosis
PENDING_PROPERTY = "qrobust_pending"  # with --qrobust-shard: a check qrobust merge judges (qrobust.gate.shards)
COLLECTOR = "qrobust-collector"
GATE_FIXTURES = {"qrobust_check", "qrobust_gate_check", "qrobust_case", "qrobust_bitwidth_case",
                 "qrobust_latency_pair", "qrobust_explanation_pair", "qrobust_quantizer_pair"}


def pytest_addoption(parser):
    group = parser.getgroup("qrobust", "qrobust: robustness gate for quantized models")
    for option in opts.OPTIONS:
        group.addoption(option.flag, dest=option.dest, default=None, metavar=option.metavar, type=option.parse,
                        help=f"{option.help}. Env {option.env}; ini {option.dest}.")
        where = " (one path, relative to this file)" if option.ini == "paths" else ""
        parser.addini(option.dest, help=option.help + where, type=ini_type(option.ini), default=None)
    for name, help_text in opts.FLAGS.items():
        dest = _flag_dest(name)
        group.addoption(f"--qrobust-{name}", dest=dest, action="store_true", default=False,
                        help=f"{help_text}. Env {dest.upper()}=1; ini {dest} = true.")
        parser.addini(dest, help=help_text, type=ini_type("bool"), default=None)


def ini_type(kind: str):
    """What an ini key of this kind (opts.INI_TYPES) is registered as, on this pytest.

    From pytest 9.2 an int or bool key is ``int | str`` (``bool | str``): pytest converts a good value
    (``3``, ``yes``; in TOML a bare 3 or true) and hands any other text to our parser, whose one line
    names the key and the file. Before 9.2 they are pytest's own ``int`` (from 8.4) and ``bool``, so a
    native ``[tool.pytest]`` table (pytest 9.0 and 9.1) takes a bare 3 or true; older pytest reads int
    keys as text, parsed by us. A value pytest refuses is one line naming the key (``_from_ini``).
    """
    if kind not in ("int", "bool"):
        return kind
    if pytest.version_tuple >= (9, 2):
        return int | str if kind == "int" else bool | str
    return "string" if kind == "int" and pytest.version_tuple < (8, 4) else kind


def _flag_dest(name: str) -> str:
    return "qrobust_" + name.replace("-", "_")


def option(config, name: str):
    """Command line, then environment, then ini, then the default; parsed by the option's own parser.
    Relative paths from the environment or command line resolve against the invocation directory; pytest
    resolves an ini file's ("paths" keys) against the ini file's directory."""
    spec = opts.BY_NAME[name]
    value = config.getoption(spec.dest)
    if value is None:
        raw = os.environ.get(spec.env)
        if raw in (None, ""):
            return _from_ini(config, spec.dest, spec.ini, spec.parse, spec.default)
        value = _parse(spec.parse, raw, spec.env)
    if spec.is_path and value is not None and not Path(value).is_absolute():
        value = str(Path(config.invocation_params.dir) / value)
    return value


def flag(config, name: str) -> bool:
    """A switch (opts.FLAGS): on from the command line, else its env var, else its ini key (a bool)."""
    dest = _flag_dest(name)
    if config.getoption(dest):
        return True
    raw = os.environ.get(dest.upper())
    if raw not in (None, ""):
        return bool(_parse(opts.parse_bool, raw, dest.upper()))
    return bool(_from_ini(config, dest, "bool", opts.parse_bool, False))


def _parse(parse, text: str, source: str):
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"{source}: {exc}") from None


def _from_ini(config, key: str, kind: str, parse, default):
    """An ini key's value through the option's own parser. pytest has converted it to its type, split a
    list (shell-style in an ini file) and made paths absolute; a value of the wrong TOML type is pytest's
    own usage error, which names the file and the key."""
    source = _ini_source(config, key)
    try:
        raw = config.getini(key)
    except (TypeError, ValueError, pytest.UsageError) as exc:  # pytest refused the value (9.0/9.1: a TypeError)
        raise pytest.UsageError(f"{source}: {_ini_refusal(str(exc), key, kind)}") from None
    if raw is None or raw == "" or raw == []:
        return default
    if kind == "paths":
        if len(raw) != 1:
            raise pytest.UsageError(f"{source}: expected one path, got {len(raw)}: {' '.join(map(str, raw))} "
                                    "(quote a path with spaces)")
        raw = raw[0]
    elif kind == "args":
        raw = ",".join(raw)
    return _parse(parse, str(raw), source)


def _ini_refusal(text: str, key: str, kind: str) -> str:
    """pytest's reason for refusing an ini value, in our words where it converted text (int and bool keys
    before pytest 9.2), else its own without its file prefix, and how to write a path or list key in a
    native ``[tool.pytest]`` table: as a TOML list, like pytest's own testpaths."""
    value = re.search(r"(?:base 10: |truth value )('.*')$", text)
    if value and kind in ("int", "bool"):
        expected = "a whole number" if kind == "int" else "yes/no, true/false, on/off or 1/0"
        return f"expected {expected}, got {value.group(1)}"
    reason = text.split(f"config option '{key}' ", 1)[-1]
    if kind in ("paths", "args"):
        example = '["out"]' if kind == "paths" else '["pair-a", "pair-b"]'
        reason += f" (in a [tool.pytest] table write a TOML list: {key} = {example})"
    return reason


def _ini_source(config, key: str) -> str:
    """Where an ini value came from, for an error: ``-o KEY`` or ``FILE: KEY`` (the ini file as invoked)."""
    if any(o.split("=", 1)[0].strip() == key for o in config.getoption("override_ini") or ()):
        return f"-o {key}"
    if config.inipath is None:
        return f"ini {key}"
    try:
        shown = Path(config.inipath).relative_to(config.invocation_params.dir)
    except ValueError:
        shown = Path(config.inipath)
    return f"{shown}: {key}"


def _validate_device(device: str) -> None:
    import torch

    kind = torch.device(device)
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--qrobust-device {device}: CUDA is not available in this torch build/machine")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise pytest.UsageError(f"--qrobust-device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise pytest.UsageError(f"--qrobust-device {device}: MPS is not available on this machine")


def pytest_configure(config):
    """Markers and the (inert) collector always; the gate only when asked for: a ``--qrobust-*`` option,
    ``QROBUST_*`` variable or ``qrobust_*`` ini key starts it here, and collecting a test that uses a gate
    fixture (the qrobust suites, a user's own gate test) starts it then. Any other pytest run of the
    environment reads no file and builds nothing, whatever thresholds.yaml its folder holds."""
    config.addinivalue_line("markers", "qrobust_tolerance(**metrics): override tolerances for this test, e.g. "
                                       "@pytest.mark.qrobust_tolerance(top1_delta=0.02)")
    config.addinivalue_line("markers", "qrobust: a qrobust gate check (added automatically)")
    config.addinivalue_line("markers", "qrobust_metrics(*names): the metrics this gate test checks; cases whose "
                                       "pair gates none of them are not generated")
    config.pluginmanager.register(_Collector(_is_worker(config)), COLLECTOR)
    if _asked_for(config):
        _start(config, eager=True)


def _asked_for(config) -> bool:
    """Whether a qrobust option is given (command line, environment or ini): the gate is wanted."""
    for dest, env in [(o.dest, o.env) for o in opts.OPTIONS] + [(_flag_dest(n), _flag_dest(n).upper()) for n in opts.FLAGS]:
        if config.getoption(dest) not in (None, False) or os.environ.get(env):
            return True
        try:
            if config.getini(dest) not in (None, "", []):
                return True
        except (TypeError, ValueError, pytest.UsageError):  # a bad value: asked for, and refused with one line
            return True
    return False


def _start(config, eager: bool):
    """Create the session: the thresholds file (the option's, else thresholds.yaml at the rootdir), the
    report folder checked writable before any model work, and pytest-benchmark's and Hypothesis's
    storage moved into it (``eager``: before pytest-benchmark creates ./.benchmarks at configure)."""
    from qrobust.errors import ConfigError, InvalidArgument
    from qrobust.session import Options, QrobustSession

    path = option(config, "thresholds")
    if path is None:
        default = Path(str(config.rootpath)) / "thresholds.yaml"
        if not default.exists():
            raise pytest.UsageError("qrobust: no thresholds file: pass --qrobust-thresholds PATH (qrobust init writes a "
                                    "starter) or create thresholds.yaml at the rootdir")
        path = str(default)
    device = option(config, "device")
    _validate_device(device)
    report = option(config, "report")
    _writable(report)
    if eager and config.pluginmanager.hasplugin("benchmark") and config.getoption("benchmark_storage", None) \
            in (None, "file://./.benchmarks"):
        config.option.benchmark_storage = f"file://{Path(report) / '.benchmarks'}"
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(Path(report) / ".hypothesis")
    options = Options(
        thresholds=path, pairs=option(config, "pairs"), device=device, seed=option(config, "seed"),
        report=report, decision=option(config, "decision"),
        max_samples=option(config, "max-samples"), save_baseline=option(config, "save-baseline"),
        overwrite_baseline=flag(config, "overwrite-baseline"), baseline=option(config, "baseline"),
        baseline_any_env=flag(config, "baseline-any-env"), sensitivity=option(config, "sensitivity") or 0,
        try_fix=flag(config, "try-fix"),
        x86_kernels=option(config, "x86-kernels"), shard=option(config, "shard"))
    option(config, "markdown")  # read at the end; a bad value is a usage error now, not after the run
    worker, slots = _is_worker(config), None
    if worker:  # share the cores between xdist workers instead of oversubscribing
        import torch

        workers = int(config.workerinput.get("workercount", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        if workers > 1:  # and share a case's sample shards between them
            from qrobust.gate.slots import SlotStore, folder_for

            slots = SlotStore(folder_for(config.workerinput["testrunuid"]), workers)
    if options.shard and not worker:  # before the workers start: a stale state would be merged as this run's
        from qrobust.gate import shards

        shards.clear(shards.folder(report, options.shard))
    progress = None if worker else TerminalProgress(config)
    try:
        session = QrobustSession(options, worker=worker, progress=progress, announce=progress and progress.line,
                                 slots=slots)
    except (ConfigError, InvalidArgument) as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION_KEY] = session
    return session


def _writable(folder: str) -> None:
    """The report folder exists (created) and takes a file, or one usage line before any model work."""
    from qrobust.errors import show

    probe = Path(folder) / f".qrobust-write-check-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise pytest.UsageError(f"--qrobust-report {show(folder)}: cannot write the report there "
                                f"({exc.strerror or type(exc).__name__})") from None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With ``-n N`` (xdist's ``load`` distribution), send whole evaluation units to workers so each case
    is evaluated once (qrobust.scheduling); other ``--dist`` modes are left to xdist."""
    session = config.stash.get(SESSION_KEY, None)
    if session is None or config.getoption("dist") != "load":
        return None
    from qrobust.scheduling import UnitScheduling, evaluation_units

    return UnitScheduling(config, log, evaluation_units(session))


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


class TerminalProgress:
    """Progress of long phases. On an interactive terminal a case's batch progress is drawn after
    pytest's own line and erased when the case ends; elsewhere (CI logs) a plain line is printed at most
    every ``LOG_INTERVAL`` seconds. Output capture is suspended for each draw, as pytest does for pdb."""

    LOG_INTERVAL = 10.0

    def __init__(self, config):
        self._capman = config.pluginmanager.getplugin("capturemanager")
        self._drawn = False
        self._last = 0.0
        self._last_log = time.monotonic()

    def _uncaptured(self):
        import contextlib

        return self._capman.global_and_fixture_disabled() if self._capman else contextlib.nullcontext()

    def line(self, text: str) -> None:
        """A whole line (e.g. which pair is being built), on terminals and in logs alike."""
        with self._uncaptured():
            sys.stdout.write(("\n" if sys.stdout.isatty() else "") + f"[qrobust] {text}\n")
            sys.stdout.flush()
        self._drawn = False

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if total < 2 or (done < total and now - self._last < 0.2):
            return
        self._last = now
        with self._uncaptured():
            if not sys.stdout.isatty():
                if done < total and now - self._last_log >= self.LOG_INTERVAL:
                    self._last_log = now
                    sys.stdout.write(f"\n[qrobust] {label}: batch {done}/{total}\n")
                    sys.stdout.flush()
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


PROBLEM_KEY = pytest.StashKey[str]()  # why the gate could not start during collection (one usage line, exit 4)


def _session(config):
    """The session, started now if a gate test asks for it first. A gate that cannot start is one usage
    line: raised again at the end of collection, where pytest prints it alone (a raise inside
    parametrization would be a collection error with a traceback per module)."""
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        return session
    if PROBLEM_KEY in config.stash:
        raise pytest.UsageError(config.stash[PROBLEM_KEY])
    try:
        return _start(config, eager=False)
    except pytest.UsageError as exc:
        config.stash[PROBLEM_KEY] = str(exc)
        raise


def pytest_generate_tests(metafunc):
    for fixture, kind in (("qrobust_gate_check", "check"), ("qrobust_case", "gate"),
                          ("qrobust_bitwidth_case", "bitwidth"), ("qrobust_latency_pair", "latency"),
                          ("qrobust_explanation_pair", "explanations"), ("qrobust_quantizer_pair", "quantizer")):
        if fixture not in metafunc.fixturenames:
            continue
        try:
            plan = _session(metafunc.config).plan
        except pytest.UsageError:  # raised again, alone, at the end of collection
            metafunc.parametrize(fixture, [_nothing_gated(metafunc, kind)])
            continue
        if kind in ("latency", "explanations", "quantizer"):
            pairs = {"latency": plan.latency_pairs, "explanations": plan.explanation_pairs,
                     "quantizer": plan.quantizer_pairs}[kind]
            metafunc.parametrize(fixture, list(pairs) or [_nothing_gated(metafunc, kind)], ids=str)
            continue
        if kind == "check":
            items = [(check, check.id, check.case.xfail) for check in plan.checks]
        else:
            cases = plan.cases if kind == "gate" else plan.bitwidth_cases
            declared = metafunc.definition.get_closest_marker("qrobust_metrics")
            if declared is not None:  # a pair restricted to other metrics (gate.<pair>.metrics) gets no test here
                cases = [c for c in cases if set(declared.args) & set(c.tolerances)]
            items = [(c, c.id, c.xfail) for c in cases]
        params = [pytest.param(value, id=name, marks=_expected_failure(xfail)) for value, name, xfail in items]
        metafunc.parametrize(fixture, params or [_nothing_gated(metafunc, kind)])


def _expected_failure(reason: str | None) -> list:
    """A known-bad case's strict xfail: only a caught violation counts (an error or a crash fails the test)."""
    if reason is None:
        return []
    from qrobust.fixture import ExpectedFailureCaught

    return [pytest.mark.xfail(strict=True, reason=reason, raises=ExpectedFailureCaught)]


def _nothing_gated(metafunc, kind: str):
    """One skipped parameter saying why a suite has nothing to check (not pytest's 'empty parameter set')."""
    declared = metafunc.definition.get_closest_marker("qrobust_metrics")
    what = f"the {kind} section" if kind in ("bitwidth", "latency", "explanations", "quantizer") else (
        f"metric {', '.join(declared.args)}" if declared else "this test")
    reason = f"the thresholds file gates no pair for {what}"
    return pytest.param(None, id="nothing-gated", marks=pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)  # the whole collection, before -k / -m deselect what the user chose not to run
def pytest_collection_modifyitems(config, items):
    """Mark gate tests, refuse a qrobust marker with an unknown metric (a typo would otherwise leave a
    test gated by the default tolerance, silently), and, when gate tests are collected, refuse a
    tolerance none of them judges (a run collecting no gate test, such as a project's unit tests, is
    not a gate run)."""
    _check_markers(items)
    if PROBLEM_KEY in config.stash:
        raise pytest.UsageError(config.stash[PROBLEM_KEY])
    qsession = config.stash.get(SESSION_KEY, None)
    if qsession is None:
        return
    judged: set = set()
    for item in items:
        judged.update(_checks_of(item, qsession.plan))
    if not judged:
        return
    _add_share_tests(items, qsession, {check[:3] for check in judged})
    missing = sorted(qsession.plan.required() - judged, key=str)
    if missing:
        shown = "; ".join(f"{m} at {p} / {pert} @ {lv:g}" for p, pert, lv, m in missing[:3])
        raise pytest.UsageError(f"qrobust: {len(missing)} tolerance(s) of {qsession.thresholds.path} are judged by no "
                                f"collected test ({shown}{'; ...' if len(missing) > 3 else ''}): collect the qrobust "
                                "suites (qrobust run, or pytest --pyargs qrobust.suites) or remove them")


def _add_share_tests(items, qsession, judged: set) -> None:
    """Under ``-n M``: M - 1 helper tests per evaluation unit a collected test judges, ``qrobust_share[<case
    id>~<slot>]``, each evaluating one slot of the case's sample shards for the worker judging it
    (qrobust.gate.slots; the scheduler sends them where they help). They judge nothing; a slot no helper
    took is evaluated by the judging worker itself."""
    if qsession.slots is None:
        return
    from qrobust.scheduling import SHARE, share_cases

    parent = next(item for item in items if "qrobust" in item.keywords).parent
    for case in share_cases(qsession, judged):
        for slot in range(1, qsession.slots.count):
            def share(case=case, slot=slot):
                qsession.evaluate_share(case, slot)

            items.append(pytest.Function.from_parent(parent, name=f"qrobust_share[{case.id}{SHARE}{slot}]",
                                                     callobj=share))


def _checks_of(item, plan) -> list[tuple]:
    """The checks (pair, perturbation, level, metric) a collected test judges, from its qrobust parameter."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    marker = item.get_closest_marker("qrobust_metrics")
    return [check for name, value in params.items() if name in GATE_FIXTURES and value is not None
            for check in plan.judged_by(name, value, tuple(marker.args) if marker else None)]


def _check_markers(items) -> None:
    for item in items:
        if GATE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("qrobust")
        for marker in item.iter_markers("qrobust_tolerance"):
            if marker.args:
                raise pytest.UsageError(f"{item.nodeid}: qrobust_tolerance takes metric=tolerance keywords, "
                                        f"not positional values {marker.args!r}")
            for metric, value in marker.kwargs.items():
                _check_marker_metric(item.nodeid, "qrobust_tolerance", metric)
                _check_marker_tolerance(item.nodeid, metric, value)
        for marker in item.iter_markers("qrobust_metrics"):
            if marker.kwargs or not marker.args:
                raise pytest.UsageError(f"{item.nodeid}: qrobust_metrics takes metric names, e.g. "
                                        "@pytest.mark.qrobust_metrics('kl_mean')")
            for metric in marker.args:
                _check_marker_metric(item.nodeid, "qrobust_metrics", metric)


def _check_marker_metric(nodeid: str, marker: str, metric) -> None:
    """A marker's metric must be in the catalogue; a typo is a usage error with the closest names."""
    from qrobust.errors import show
    from qrobust.metrics.catalog import METRICS
    from qrobust.registry import did_you_mean

    if metric not in METRICS:
        raise pytest.UsageError(f"{nodeid}: @pytest.mark.{marker}: unknown metric {show(metric)}"
                                f"{did_you_mean(metric, METRICS)}")


def _check_marker_tolerance(nodeid: str, metric: str, value) -> None:
    """A marker's tolerance is checked as a thresholds file's: a finite number >= 0 the metric can meet and miss."""
    import math

    from qrobust._validation import is_number
    from qrobust.errors import show
    from qrobust.metrics.catalog import METRICS

    number = is_number(value) and math.isfinite(value) and value >= 0
    problem = METRICS[metric].tolerance_problem(value) if number else "expected a finite number >= 0"
    if problem:
        raise pytest.UsageError(f"{nodeid}: @pytest.mark.qrobust_tolerance({metric}=...): {problem}, got {show(value)}")


@pytest.fixture(scope="session")
def qrobust(request):
    """The session object: thresholds, plan, loaded pairs (each once), the evaluator."""
    return _session(request.config)


@pytest.fixture
def qrobust_check(request, qrobust):
    """``qrobust_check(case, metric_or_metrics)``; also ``.metric(case, *names)``, ``.explanations(pair)``,
    ``.speedup(pair)``: evaluate (once per session), decide, record, fail with every violated metric."""
    from qrobust.fixture import QrobustCheck

    node = request.node
    properties = {"case": CASE_PROPERTY, "diagnosis": DIAGNOSIS_PROPERTY, "pending": PENDING_PROPERTY}
    return QrobustCheck(node, qrobust, carry=lambda kind, value: node.user_properties.append((properties[kind], value)))


@pytest.fixture(scope="session")
def qrobust_evaluator(qrobust):
    """The session's Evaluator, for users writing their own gate tests on the same cached cases."""
    return qrobust.evaluator


class _Collector:
    """Controller-side plugin: gathers checks from test reports (local or from xdist workers)."""

    def __init__(self, worker: bool = False):
        self.worker = worker  # a worker's reports travel to the controller untouched
        self.records: list[dict] = []
        self.pending: list[dict] = []  # with --qrobust-shard: the checks qrobust merge judges
        self.gate_reports = 0
        self.worker_outputs: list[dict] = []
        self.runs: set[str] = set()  # the xdist runs whose workers reported down

    @pytest.hookimpl(tryfirst=True)  # before junitxml reads the properties (it does, from the teardown report)
    def pytest_runtest_logreport(self, report):
        if self.worker:
            return
        if report.when == "setup" and "qrobust" in report.keywords:  # every test has one (a skipped one too)
            self.gate_reports += 1
        kept = []
        diagnosis = next((v for n, v in report.user_properties if n == DIAGNOSIS_PROPERTY), None)
        for name, value in report.user_properties:
            if name == DIAGNOSIS_PROPERTY:
                kept.append(("qrobust_worst_layers", diagnosis["line"]))
                continue
            if name == PENDING_PROPERTY:
                if report.when == "call":
                    self.pending.append(value)
                continue
            if name != CASE_PROPERTY:
                kept.append((name, value))
                continue
            record = dict(value)
            if diagnosis is not None and record["verdict"] in ("fail", "inconclusive"):
                record["diagnosis"] = {k: diagnosis[k] for k in ("line", "layers", "samples", "sensitivity", "fix")
                                       if k in diagnosis}
            if report.when in ("setup", "call"):
                self.records.append(record)
            kept += junit_properties(record)
        report.user_properties = kept  # JUnit gets flat properties, not the transport's records

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        output = getattr(node, "workeroutput", {}).get("qrobust")
        if output:
            self.worker_outputs.append(json.loads(output))
        self.runs.add(node.workerinput.get("testrunuid", ""))

    def remove_slots(self) -> None:
        """The folders the workers shared a case's shards through (qrobust.gate.slots), once they are down."""
        import shutil

        from qrobust.gate.slots import folder_for

        for run in filter(None, self.runs):
            shutil.rmtree(folder_for(run), ignore_errors=True)


HTML_HISTORY = pytest.StashKey[list]()  # this process's records, for the pytest-html charts


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A gate test that failed without a failing record (a fixture or setup error, a crash before the
    check object ran, a test's own assertion after passing checks) gets error records for its checks, or
    one for the test when it judges none of the plan's, so report.json says what JUnit and the exit code
    say. With pytest-html, a failing check carries its chart (the levels recorded so far) and its case's
    CAM overlay as the test's extras."""
    outcome = yield
    report = outcome.get_result()
    qsession = item.config.stash.get(SESSION_KEY, None)
    if qsession is None or report.when not in ("setup", "call") or "qrobust" not in item.keywords:
        return
    from qrobust.gate.verdict import fails

    if report.failed and not any(fails(v) for n, v in report.user_properties if n == CASE_PROPERTY):
        reason = _failure_line(call, report)
        errors = [(CASE_PROPERTY, qsession.error_record(item.nodeid, *check, reason))
                  for check in _checks_of(item, qsession.plan) or [("", "", 0.0, "")]]
        report.user_properties = [*report.user_properties, *errors]
        item.user_properties += errors  # JUnit reads the properties of the teardown report
    if report.when != "call" or not item.config.pluginmanager.hasplugin("html"):
        return
    from qrobust.gate.html_report import case_extras

    records = [v for n, v in report.user_properties if n == CASE_PROPERTY]
    history = item.config.stash.setdefault(HTML_HISTORY, [])
    history += records
    for r in records:
        if r["verdict"] in ("fail", "inconclusive"):
            overlays = qsession.case_overlays(r["pair"], r["perturbation"], r["level"])
            report.extras = [*getattr(report, "extras", []), *case_extras(r, history, overlays)]


def _failure_line(call, report) -> str:
    """One line of why a test failed: its exception's message, else the first line of its report."""
    from qrobust.errors import one_line

    if call.excinfo is not None:
        return f"{call.excinfo.typename}: {one_line(call.excinfo.value)}"
    return one_line(Exception(str(report.longrepr).splitlines()[0] if report.longrepr else "failed"))


def junit_properties(record: dict) -> list[tuple[str, object]]:
    """One flat property per field of a check, for CI systems that show JUnit properties (the set repeats
    when one test checks several metrics)."""
    interval = record["interval"] or [None, None]
    fields = {"metric": record["metric"], "value": record["value"], "tolerance": record["tolerance"],
              "direction": record["direction"], "verdict": record["verdict"], "interval_low": interval[0],
              "interval_high": interval[1], "n": record["n"], "fragile": record.get("fragile", False)}
    return [(f"qrobust_{name}", "" if value is None else value) for name, value in fields.items()]


OUTCOME_KEY = pytest.StashKey["object"]()  # the finished run's Outcome (qrobust.session), for the terminal summary


@pytest.hookimpl(tryfirst=True)  # before junitxml writes its file
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    qsession = config.stash.get(SESSION_KEY, None)
    if _is_worker(config):
        if qsession is not None:
            config.workeroutput["qrobust"] = json.dumps(qsession.worker_output())
            if qsession.options.shard:
                qsession.write_states(config.workerinput["workerid"])
        return
    collector = config.pluginmanager.get_plugin(COLLECTOR)
    collector.remove_slots()
    if collector.gate_reports == 0 and not collector.records:
        return
    if qsession is None:  # the controller of an -n run whose workers started the gate when they collected it
        qsession = _session(config)
    from qrobust.session import Outcome

    if exitstatus == pytest.ExitCode.INTERRUPTED:
        config.stash[OUTCOME_KEY] = Outcome([], ["run interrupted: report not written, the previous report is left intact"])
        return
    if qsession.options.shard:
        qsession.write_states("controller")
        config.stash[OUTCOME_KEY] = qsession.finish_shard(collector.records, collector.pending,
                                                          [qsession.worker_output()] + collector.worker_outputs,
                                                          gate_tests=collector.gate_reports)
        return
    outputs = [qsession.worker_output()] + collector.worker_outputs
    try:
        outcome = qsession.finish(collector.records, outputs, option(config, "report"), gate_tests=collector.gate_reports,
                                  verbose=config.option.verbose > 0, markdown=_markdown_paths(config),
                                  command=["pytest", *map(str, config.invocation_params.args)])
        _suite_properties(config, outcome)
    except Exception as exc:  # noqa: BLE001 - a report that cannot be written must fail the run, visibly
        from qrobust.errors import show

        outcome = Outcome([], [f"report not written: {type(exc).__name__}: {show(str(exc), 300)}"])
    config.stash[OUTCOME_KEY] = outcome
    for line in outcome.failures:  # a failure of the run itself is a failed test too: JUnit and the exit code agree
        _report_gate_failure(config, line)
    if outcome.failures and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _report_gate_failure(config, line: str) -> None:
    """A failed test report for a failure of the whole run, through pytest's own hook, so the terminal's
    counts and JUnit XML list it (as ``qrobust::gate``) like any failed check."""
    from _pytest.reports import TestReport

    from qrobust.session import GATE_TEST

    report = TestReport(GATE_TEST, ("qrobust", None, "qrobust gate"), {"qrobust": 1}, "failed",
                        f"qrobust: {line}", "call")
    config.hook.pytest_runtest_logreport(report=report)


def _markdown_paths(config) -> list[str]:
    """Where the Markdown summary goes: --qrobust-markdown, and $GITHUB_STEP_SUMMARY when set (appended)."""
    paths = [p for p in (option(config, "markdown"),) if p]
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        paths.append(os.environ["GITHUB_STEP_SUMMARY"])
    return paths


def _suite_properties(config, outcome) -> None:
    """JUnit testsuite properties, written by the controller (so they are there under -n too)."""
    from _pytest.junitxml import xml_key

    xml = config.stash.get(xml_key, None)
    if xml is None or outcome.report is None:
        return
    env = outcome.report["environment"]
    for name in ("run_id", "qrobust_version"):
        xml.add_global_property(f"qrobust_{name}", outcome.report[name])
    for name in ("torch", "cpu_capability", "seed", "decision", "thresholds_sha256"):
        xml.add_global_property(f"qrobust_{name}", env[name])
    xml.add_global_property("qrobust_report", str(outcome.paths[1]))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    outcome = config.stash.get(OUTCOME_KEY, None)
    if outcome is None or _is_worker(config):
        return
    terminalreporter.section("qrobust")
    for line in outcome.lines:
        terminalreporter.write_line(line)
    for line in outcome.failures:
        terminalreporter.write_line(f"qrobust: FAILED: {line}", red=True)
