"""The plugin is inert unless asked: installed, it loads in every pytest run of the environment, and a
project with an unrelated thresholds.yaml (or none) must see no file read, no model built, no failure."""
import pytest

ASSERT_NOTHING_STARTED = """
    import sys

    def pytest_sessionfinish(session):
        # no gate started: neither its session module nor torch was imported
        assert "qrobust.session" not in sys.modules and "torch" not in sys.modules, "qrobust started a gate"
"""


def test_an_unrelated_project_with_its_own_thresholds_yaml_is_unaffected(pytester):
    pytester.makefile(".yaml", thresholds="alerts: {cpu: 90}\n")  # before: exit 4, "alerts: unknown key"
    pytester.makeconftest(ASSERT_NOTHING_STARTED)
    pytester.makepyfile(test_app="def test_ok():\n    assert True\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    assert "qrobust" not in result.stdout.str().split("plugins:")[-1].split("\n", 1)[-1]  # no summary section


def test_a_project_without_any_thresholds_file_is_unaffected(pytester):
    pytester.makeconftest(ASSERT_NOTHING_STARTED)
    pytester.makepyfile(test_app="def test_ok():\n    assert True\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_collecting_a_gate_test_starts_the_gate_from_the_rootdir_thresholds(pytester):
    from helpers import SUITE, thresholds

    pytester.makefile(".yaml", thresholds=thresholds(tolerances="{top1_delta: 0.01}"))
    pytester.makepyfile(test_gate=SUITE.split("\ndef test_agreement")[0])
    result = pytester.runpytest("-p", "no:cacheprovider", "--qrobust-max-samples", "60")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*qrobust gate: PASSED*"])


def test_the_suites_without_a_thresholds_file_are_one_usage_line(pytester):
    """Before: 7 collection errors, each with a pluggy traceback."""
    result = pytester.runpytest("--pyargs", "qrobust.suites", f"--rootdir={pytester.path}", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.startswith("ERROR")]
    assert errors == ["ERROR: qrobust: no thresholds file: pass --qrobust-thresholds PATH (qrobust init writes a "
                      "starter) or create thresholds.yaml at the rootdir"], result.stderr.str()
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_the_report_folder_is_checked_before_any_model_work(pytester):
    from helpers import SUITE, thresholds

    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_gate=SUITE)
    (pytester.path / "taken").write_text("a file, not a folder")
    result = pytester.runpytest("-p", "no:cacheprovider", "--qrobust-report", "taken/report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "taken/report': cannot write the report there (Not a directory)" in result.stderr.str()
    assert "building pair" not in result.stdout.str()


def test_a_gate_run_leaves_nothing_but_its_report_in_the_folder(pytester):
    """pytest-benchmark's storage and Hypothesis's go into the report folder, not ./.benchmarks and
    ./.hypothesis (the quantizer properties run Hypothesis)."""
    from helpers import thresholds

    (pytester.path / "gate.yaml").write_text(thresholds(tolerances="{top1_delta: 0.01}"))
    before = {p.name for p in pytester.path.iterdir()}
    result = pytester.runpytest_subprocess("--pyargs", "qrobust.suites", "--qrobust-thresholds", "gate.yaml",
                                           f"--rootdir={pytester.path}", "-p", "no:cacheprovider",
                                           "--qrobust-max-samples", "40", "-k", "top1_delta or quantizer")
    assert result.ret == 0, result.stdout.str()[-2000:]
    pytesters_own = {"stdout", "stderr", "runpytest-0", "runpytest-current"}  # runpytest_subprocess's bookkeeping
    assert {p.name for p in pytester.path.iterdir()} - before - pytesters_own == {"qrobust-report"}
    assert {".benchmarks", ".hypothesis"} <= {p.name for p in (pytester.path / "qrobust-report").iterdir()}
