"""Options and markers are checked when pytest starts: one line each, never a traceback per test."""
import json
import re
import textwrap
from pathlib import Path

import pytest

from helpers import SUITE, thresholds

pytestmark = pytest.mark.usefixtures("warm_pairs")


@pytest.fixture(scope="module")
def warm_pairs():
    from qrobust.models import load_pair

    load_pair("lenet5-digits-int8-x86")


def usage_error(result) -> str:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    text = result.stderr.str()
    assert "Traceback" not in text + result.stdout.str()
    return text


def start_error(pytester, *args) -> str:
    """The usage error of a gate suite started with these arguments (the environment and ini as set)."""
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_gate=SUITE)
    return usage_error(pytester.runpytest(*args))


@pytest.mark.parametrize("args, message", [
    (["--qrobust-device", "gpu0"], "argument --qrobust-device: expected cpu, cuda, cuda:N, mps or xpu[:N], got 'gpu0'"),
    (["--qrobust-seed", "abc"], "argument --qrobust-seed: expected a whole number, got 'abc'"),
    (["--qrobust-max-samples", "0"], "argument --qrobust-max-samples: must be >= 1, got 0"),
    (["--qrobust-decision", "maybe"], "argument --qrobust-decision: expected point, strict, lenient, familywise, got 'maybe'"),
    (["--qrobust-pairs", " , "], "argument --qrobust-pairs: expected comma-separated pair names"),
    (["--qrobust-shard", "4/3"], "argument --qrobust-shard: expected K/N with 1 <= K <= N (job K of N), got '4/3'"),
    (["--qrobust-shard", "0/3"], "argument --qrobust-shard: expected K/N with 1 <= K <= N (job K of N), got '0/3'"),
    (["--qrobust-shard", "2"], "argument --qrobust-shard: expected K/N with 1 <= K <= N (job K of N), got '2'"),
])
def test_bad_options_are_one_line_at_start(pytester, args, message):
    assert message in start_error(pytester, *args)


def test_environment_values_go_through_the_same_parsers(pytester, monkeypatch):
    monkeypatch.setenv("QROBUST_SEED", "-3")
    assert "QROBUST_SEED: must be >= 0, got -3" in start_error(pytester)


def test_an_unavailable_device_is_one_line_at_start(pytester):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_gate=SUITE)
    assert "--qrobust-device cuda: CUDA is not available" in usage_error(pytester.runpytest("--qrobust-device", "cuda"))


def test_ini_thresholds_resolve_against_the_rootdir(pytester, monkeypatch):
    pytester.makeini("[pytest]\nqrobust_thresholds = gate.yaml\n")
    (pytester.path / "gate.yaml").write_text(thresholds())
    sub = pytester.mkdir("sub")
    (sub / "test_gate.py").write_text(textwrap.dedent(SUITE))
    monkeypatch.chdir(sub)  # invoked from a subfolder: the ini's path is still relative to the ini's folder
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=12)


MARKED = """
    import pytest

    @pytest.mark.qrobust_tolerance({marker})
    def test_agreement(qrobust_case, qrobust_check):
        qrobust_check(qrobust_case, "agreement")
"""


@pytest.mark.parametrize("marker, message", [
    ("top1_delat=0.01", "@pytest.mark.qrobust_tolerance: unknown metric 'top1_delat'; did you mean 'top1_delta'?"),
    ("agreement='0.9'", "qrobust_tolerance(agreement=...): expected a finite number >= 0, got '0.9'"),
    ("agreement=float('nan')", "qrobust_tolerance(agreement=...): expected a finite number >= 0, got nan"),
    ("agreement=1.01", "qrobust_tolerance(agreement=...): no value of agreement can meet it (agreement runs from 0 to 1), "
                       "got 1.01"),
    ("0.9", "qrobust_tolerance takes metric=tolerance keywords"),
])
def test_misspelled_or_bad_tolerance_markers_are_usage_errors(pytester, marker, message):
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_marked=MARKED.format(marker=marker))
    assert message in usage_error(pytester.runpytest())


def test_unknown_metrics_marker_is_a_usage_error(pytester):
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_marked="""
        import pytest

        @pytest.mark.qrobust_metrics("kl_maen")
        def test_kl(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "kl_mean")
    """)
    assert "qrobust_metrics: unknown metric 'kl_maen'; did you mean 'kl_mean'?" in usage_error(pytester.runpytest())


def test_two_tests_of_one_metric_keep_one_record_each(pytester):
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_two="""
        import pytest

        def test_default(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "kl_mean")

        @pytest.mark.qrobust_tolerance(kl_mean=0.5)
        def test_loose(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "kl_mean")
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=8)
    cases = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())["cases"]
    keys = [(c["test"], c["pair"], c["perturbation"], c["level"], c["metric"]) for c in cases]
    assert len(keys) == len(set(keys)) == 8
    assert {c["tolerance"] for c in cases if "test_loose" in c["test"]} == {0.5}
    assert {c["tolerance"] for c in cases if "test_default" in c["test"]} == {0.02}


def test_int8_forwards_leave_the_quantized_engine_as_they_found_it(pytester):
    import torch

    from qrobust.models import load_pair

    pair = load_pair("lenet5-digits-int8-x86")
    before = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        with torch.inference_mode():
            pair.quantized(torch.zeros(2, 1, 32, 32))
        assert torch.backends.quantized.engine == "qnnpack"
    finally:
        torch.backends.quantized.engine = before
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_gate=SUITE)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=12)
    env = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())["environment"]
    assert "quantized_engine" not in env  # a process global is not a property of the run...
    assert env["pairs"]["lenet5-digits-int8-x86"]["recipe"]["engine"] == "x86"  # ...the pair's engine is


def test_a_relative_baseline_margin_catches_what_the_absolute_one_misses(pytester):
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_gate=SUITE)
    pytester.runpytest("-p", "no:cacheprovider", "--qrobust-save-baseline", "base.json").assert_outcomes(passed=12)
    saved = json.loads((pytester.path / "base.json").read_text())
    for key in saved["values"]:
        if key.endswith("|kl_mean"):
            saved["values"][key] = saved["values"][key] / 40  # the baseline was 40x better
    (pytester.path / "base.json").write_text(json.dumps(saved))
    pytester.runpytest("-p", "no:cacheprovider", "--qrobust-baseline", "base.json").assert_outcomes(passed=12)
    relative = thresholds() + "baseline: {kl_mean: {relative: 0.5}}\n"
    pytester.makefile(".yaml", thresholds=relative)
    result = pytester.runpytest("-p", "no:cacheprovider", "--qrobust-baseline", "base.json")
    result.assert_outcomes(passed=8, failed=4)
    out = result.stdout.str()
    assert "kl_mean regressed from baseline" in out and "allowed 50% of the baseline" in out
    assert "from baseline)" in out  # the summary names the cause
    cases = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())["cases"]
    assert {c["failed_by"] for c in cases if c["verdict"] == "fail"} == {"baseline"}


def test_the_summary_flags_fragile_verdicts(pytester):
    # the int8 twin flips a few of 120 digits at awgn 0.1: a tolerance right at its count is fragile
    pytester.makefile(".yaml", thresholds=textwrap.dedent("""\
        decision: point
        max_samples: 120
        replicates: 100
        defaults: {agreement: 1.0}
        perturbations: {awgn: {levels: [0]}}
        gate: {lenet5-digits-int8-x86: {}}
        """))
    pytester.makepyfile(test_gate=SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*1 checks: 1 pass*1 fragile*", "*agreement*worst 1 >= 1 at awgn 0*pass, fragile)*"])


README = Path(__file__).parents[2] / "README.md"
ROW = re.compile(r"^\| `(--qrobust-[a-z0-9-]+)(?: ([^`]+))?` \| `(QROBUST_[A-Z0-9_]+)` \| `(qrobust_[a-z0-9_]+)` \((\w+)\) \|")


def readme_options() -> dict[str, tuple]:
    """The README's Options table: flag -> (metavar or None, env, ini key, ini type)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Options"):text.index("### thresholds.yaml")]
    rows = [ROW.match(line) for line in section.splitlines() if line.startswith("| `--qrobust-")]
    assert all(rows), [line for line, row in zip(section.splitlines(), rows) if not row]
    return {m[1]: (m[2], m[3], m[4], m[5]) for m in rows if m}


def shown_ini_type(documented: str) -> str:
    """How pytest --help shows a documented ini type (see ini_type: from 9.2 an int or bool key also takes
    text; before 8.4 an int key is text)."""
    from qrobust.plugin import ini_type

    kind = ini_type(documented)
    return kind if isinstance(kind, str) else f"{documented} | string"


def test_help_shows_the_metavars_env_and_ini_types_the_readme_documents(pytester):
    from qrobust import _options as opts

    documented = readme_options()
    declared = {o.flag: (o.metavar, o.env, o.dest, o.ini) for o in opts.OPTIONS}
    declared |= {f"--qrobust-{n}": (None, "QROBUST_" + n.replace("-", "_").upper(), "qrobust_" + n.replace("-", "_"),
                                    "bool") for n in opts.FLAGS}
    assert documented == declared
    out = pytester.runpytest("--help").stdout.str()
    metavars = dict(re.findall(r"^  (--qrobust-[a-z0-9-]+)(?:=(\S+))?", out, flags=re.M))
    assert metavars == {flag: metavar or "" for flag, (metavar, *_) in documented.items()}
    ini = dict(re.findall(r"^  (qrobust_[a-z0-9_]+) \(([^)]+)\):", out, flags=re.M))
    assert ini == {key: shown_ini_type(kind) for _, _, key, kind in documented.values()}
    for flag, (_, env, key, _) in documented.items():
        assert env in out and key in out, flag


def test_int_and_bool_keys_are_registered_as_each_pytest_takes_them(monkeypatch):
    from qrobust.plugin import ini_type

    for version, int_type, bool_type in (((9, 2, 0), int | str, bool | str), ((9, 1, 0), "int", "bool"),
                                         ((8, 4, 0), "int", "bool"), ((8, 3, 5), "string", "bool"),
                                         ((7, 4, 4), "string", "bool")):
        monkeypatch.setattr(pytest, "version_tuple", version)
        assert (ini_type("int"), ini_type("bool"), ini_type("paths"), ini_type("args")) == (
            int_type, bool_type, "paths", "args"), version


SESSION_OPTIONS = """
    from pathlib import Path

    def test_options(qrobust, pytestconfig):
        o = qrobust.options
        root = Path(str(pytestconfig.inipath)).parent
        assert (o.seed, qrobust.seed, o.max_samples) == (3, 3, 8) and type(o.seed) is int
        assert o.pairs == ("lenet5-digits-int8-x86",)
        assert o.thresholds == str(root / "gates" / "gate.yaml") and o.report == str(root / "out dir")
        assert o.baseline_any_env is True and o.overwrite_baseline is False
"""


@pytest.mark.parametrize("name, config", [
    ("pytest.ini", """\
        [pytest]
        qrobust_thresholds = gates/gate.yaml
        qrobust_seed = 3
        qrobust_max_samples = 8
        qrobust_pairs = lenet5-digits-int8-x86
        qrobust_report = "out dir"
        qrobust_baseline_any_env = yes
        qrobust_overwrite_baseline = 0
        """),
    ("pyproject.toml", """\
        [tool.pytest.ini_options]
        qrobust_thresholds = "gates/gate.yaml"
        qrobust_seed = 3
        qrobust_max_samples = "8"
        qrobust_pairs = ["lenet5-digits-int8-x86"]
        qrobust_report = ["out dir"]
        qrobust_baseline_any_env = true
        qrobust_overwrite_baseline = "no"
        """),
    ("pyproject.toml", """\
        [tool.pytest]
        qrobust_thresholds = ["gates/gate.yaml"]
        qrobust_seed = 3
        qrobust_max_samples = 8
        qrobust_pairs = ["lenet5-digits-int8-x86"]
        qrobust_report = ["out dir"]
        qrobust_baseline_any_env = true
        qrobust_overwrite_baseline = false
        """),
])
def test_typed_ini_keys_reach_the_session(pytester, monkeypatch, name, config):
    if "[tool.pytest]" in config and pytest.version_tuple < (9, 0):
        pytest.skip("pytest < 9.0 reads no native [tool.pytest] table")
    (pytester.path / name).write_text(textwrap.dedent(config))
    pytester.mkdir("gates")
    (pytester.path / "gates" / "gate.yaml").write_text(thresholds())
    sub = pytester.mkdir("sub")
    (sub / "test_session.py").write_text(textwrap.dedent(SESSION_OPTIONS))
    monkeypatch.chdir(sub)  # paths are relative to the ini file, not to where pytest runs
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


@pytest.mark.parametrize("name, config, args, message", [
    ("pytest.ini", "[pytest]\nqrobust_seed = abc\n", [], "pytest.ini: qrobust_seed: expected a whole number, got 'abc'"),
    ("pytest.ini", "[pytest]\nqrobust_seed = 2.5\n", [], "pytest.ini: qrobust_seed: expected a whole number, got '2.5'"),
    ("pytest.ini", "[pytest]\nqrobust_max_samples = 0\n", [], "pytest.ini: qrobust_max_samples: must be >= 1, got 0"),
    ("pytest.ini", "[pytest]\nqrobust_baseline_any_env = maybe\n", [],
     "pytest.ini: qrobust_baseline_any_env: expected yes/no, true/false, on/off or 1/0, got 'maybe'"),
    ("pytest.ini", "[pytest]\nqrobust_report = my report\n", [], "pytest.ini: qrobust_report: expected one path, got 2"),
    ("pytest.ini", "[pytest]\nqrobust_markdown = a b\n", [], "pytest.ini: qrobust_markdown: expected one path, got 2"),
    ("pytest.ini", "[pytest]\n", ["-o", "qrobust_seed=-1"], "-o qrobust_seed: must be >= 0, got -1"),
    ("pyproject.toml", "[tool.pytest.ini_options]\nqrobust_seed = \"x\"\n", [], "pyproject.toml: qrobust_seed: expected a whole number, got 'x'"),
    # a value of the wrong TOML type in a native table (pytest 9.0+): pytest's reason, one line naming the key
    ("pyproject.toml", "[tool.pytest]\nqrobust_seed = 2.5\n", [], "pyproject.toml: qrobust_seed: expects "),
    ("pyproject.toml", "[tool.pytest]\nqrobust_report = \"out\"\n", [],
     "pyproject.toml: qrobust_report: expects a list for type 'paths', got str: 'out' (in a [tool.pytest] table "
     "write a TOML list: qrobust_report = [\"out\"])"),
])
def test_bad_ini_values_are_one_line_naming_the_key(pytester, name, config, args, message):
    if "[tool.pytest]" in config and pytest.version_tuple < (9, 0):
        pytest.skip("pytest < 9.0 reads no native [tool.pytest] table")
    (pytester.path / name).write_text(config)
    assert message in start_error(pytester, *args)


def test_switches_fall_back_to_their_environment_variables(pytester, monkeypatch):
    monkeypatch.setenv("QROBUST_OVERWRITE_BASELINE", "nope")
    assert "QROBUST_OVERWRITE_BASELINE: expected yes/no" in start_error(pytester)
    monkeypatch.setenv("QROBUST_OVERWRITE_BASELINE", "1")
    pytester.makepyfile(test_flag="def test_flag(qrobust): assert qrobust.options.overwrite_baseline is True")
    pytester.runpytest("-p", "no:cacheprovider", "test_flag.py").assert_outcomes(passed=1)
