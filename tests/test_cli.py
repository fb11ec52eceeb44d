"""The ``qrobust`` command as a new user meets it after ``pip install qrobust``, from an empty folder:
its own help, the thresholds file wherever it stands, pipes closed early, nothing-to-do usage errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qrobust import _options as opts
from qrobust import cli
from qrobust.cli import main, split_run

ROOT = Path(__file__).parents[1]


def qrobust(*args, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "qrobust", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_run_help_is_qrobusts_usage_then_the_way_to_pytests(capsys, flag):
    assert main(["run", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qrobust run [THRESHOLDS] [PYTEST ARGS]") and "THRESHOLDS" in out.split("options")[0]
    for option in opts.OPTIONS:
        if option.name != "thresholds":  # THRESHOLDS is it
            assert f"{option.flag} {option.metavar}" in out, option.flag
            assert option.help.split()[0] in out.split(option.flag)[1][:200], option.flag
    assert all(f"--qrobust-{name}" in out for name in opts.FLAGS)
    assert out.rstrip().splitlines()[-1] == "pytest's own options (qrobust's among them): qrobust run --pytest-help"
    assert len(out.splitlines()) < 80  # pytest's help is 565 lines, qrobust's options from line 318


def test_run_pytest_help_is_pytests_help(tmp_path):
    result = qrobust("run", "--pytest-help", cwd=tmp_path)
    assert result.returncode == 0 and "--qrobust-seed=N" in result.stdout and "-k EXPRESSION" in result.stdout


def test_help_template_and_usage_errors_import_neither_torch_nor_pytest(tmp_path):
    script = ("import contextlib, io, sys\nfrom qrobust.cli import main\n"
              "for argv in (['--help'], ['run', '--help'], ['template'], ['propose']):\n"
              "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
              "        try:\n            main(argv)\n        except SystemExit:\n            pass\n"
              "print(sorted({'torch', 'pytest'} & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["run", "-h"], ["template"], ["schema"],
                                  ["run", "--pytest-help"], ["propose", "--help"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, args):
    """`qrobust run --help | head -3`, `qrobust template | head -1`: no traceback, and the exit code Python
    gives a closed pipe (0 where argparse drops its own message). The reader closes its end before the
    first write: one that reads a few bytes first is the same error on a later write, but a pipe buffer
    (64 KiB) can take a whole output before it closes, and the test would pass without one."""
    r, w = os.pipe()
    os.close(r)
    process = subprocess.Popen([sys.executable, "-m", "qrobust", *args], cwd=tmp_path, stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    err = process.communicate(timeout=120)[1].decode()
    assert err == "" and process.returncode in (0, 1), (process.returncode, err)


@pytest.mark.parametrize("args,files,rest", [
    (["gate.yaml", "-q"], ["gate.yaml"], ["-q"]),
    (["-q", "gate.yaml"], ["gate.yaml"], ["-q"]),
    (["-q", "-x", "gate.YML", "-n", "2"], ["gate.YML"], ["-q", "-x", "-n", "2"]),
    (["gate.txt", "-q"], ["gate.txt"], ["-q"]),  # the first argument, as before, whatever its suffix
    (["-q", "tests/"], [], ["-q", "tests/"]),  # any other positional is pytest's
    (["--junitxml", "out.yml", "gate.yaml"], ["gate.yaml"], ["--junitxml", "out.yml"]),
    (["--junitxml=out.yml", "gate.yaml"], ["gate.yaml"], ["--junitxml=out.yml"]),
    (["-c", "pytest.yml", "-k", "a.yaml", "-m", "b.yaml", "-o", "x=c.yaml", "-p", "d.yaml"], [],
     ["-c", "pytest.yml", "-k", "a.yaml", "-m", "b.yaml", "-o", "x=c.yaml", "-p", "d.yaml"]),
    (["--qrobust-markdown", "summary.yaml", "--qrobust-seed", "1", "g.yaml"], ["g.yaml"],
     ["--qrobust-markdown", "summary.yaml", "--qrobust-seed", "1"]),
    (["--qrobust-overwrite-baseline", "g.yaml"], ["g.yaml"], ["--qrobust-overwrite-baseline"]),  # a switch
    (["-q", "--", "other.yaml"], [], ["-q", "other.yaml"]),  # after --, pytest's
    (["--", "-q"], [], ["-q"]),
    (["a.yaml", "-q", "b.yml"], ["a.yaml", "b.yml"], ["-q"]),
])
def test_the_thresholds_file_is_found_wherever_it_stands(args, files, rest):
    assert split_run(args)[:2] == (files, rest)


def test_every_qrobust_option_with_a_value_is_known_to_take_one():
    """A value of --qrobust-report, --qrobust-baseline, ... standing apart is never the thresholds file."""
    for option in opts.OPTIONS:
        assert split_run([option.flag, "x.yaml"])[0] == [], option.flag


def test_the_pytest_options_said_to_take_a_value_do(pytestconfig):
    """The hand-kept list matches this pytest and its plugins: each takes one value."""
    parser = pytestconfig._parser.optparser
    takes = {s for a in parser._actions if a.nargs is None and a.option_strings for s in a.option_strings}
    assert cli.PYTEST_VALUE_OPTIONS <= takes, cli.PYTEST_VALUE_OPTIONS - takes


def test_two_thresholds_files_or_a_missing_one_are_one_usage_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "a.yaml", "-q", "b.yml"]) == 4
    err = capsys.readouterr().err
    assert err == ("qrobust run: 2 thresholds files given ('a.yaml', 'b.yml'); gate one at a time "
                   "(or pass the others to pytest after --)\n")
    assert main(["run", "-q", "my-gate.yaml"]) == 4
    assert capsys.readouterr().err == ("qrobust run: thresholds file 'my-gate.yaml' does not exist "
                                       "(qrobust init writes a starter)\n")


@pytest.mark.slow
def test_options_before_the_thresholds_file_reach_pytest_with_it(tmp_path):
    """`qrobust run -q my-gate.yaml` answered pytest's "not found: my-gate.yaml"."""
    from helpers import thresholds

    (tmp_path / "my-gate.yaml").write_text(thresholds())
    result = qrobust("run", "-q", "my-gate.yaml", "--collect-only", "-p", "no:randomly", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\d+ tests? collected", result.stdout) and "lenet5-digits-int8-x86" in result.stdout


def test_propose_with_nothing_to_read_is_one_usage_line(tmp_path, capsys):
    """It used to gate the built-in gate three times (hours), silently."""
    assert main(["propose"]) == 4
    assert main(["propose", "--seeds", "0,1", "--", "-n", "2"]) == 4
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0] == err[1]
    assert err[0] == ("qrobust propose: nothing to fit: give a thresholds file to gate at each seed (qrobust propose "
                      "my-gate.yaml; for the built-in gate, qrobust template > gate.yaml first) or --from REPORT ...")


def test_propose_from_reports_alone_reads_them_against_the_built_in_gate(tmp_path):
    """`--from` needs no thresholds argument: the reports name the gate they came from, the built-in one
    unless a file is given."""
    import json

    from qrobust.gate.config import load_thresholds

    record = {"pair": "lenet5-digits-int8-x86", "perturbation": "awgn", "level": 0, "metric": "kl_mean",
              "value": 0.0002, "interval": [0.00015, 0.00025], "n": 450}
    (tmp_path / "r.json").write_text(json.dumps({"cases": [record]}))
    out = tmp_path / "fitted.yaml"
    assert main(["propose", "--from", str(tmp_path / "r.json"), "--pair", record["pair"], "-o", str(out)]) == 0
    assert set(load_thresholds(out).gate) == set(load_thresholds(cli.BUILTIN_THRESHOLDS).gate)


def test_pytest_xdist_comes_with_qrobust():
    """The README's `-n 4`: a plain `pip install qrobust` must bring pytest-xdist."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"pytest-xdist\b", d) for d in project["dependencies"])


@pytest.mark.parametrize("args, line", [
    (["--qrobust-shard", "3/2"], "qrobust run: argument --qrobust-shard: expected K/N with 1 <= K <= N (job K of N), "
                                 "got '3/2'"),
    (["-q", "--qrobust-max-samples=abc"], "qrobust run: argument --qrobust-max-samples: expected a whole number, "
                                          "got 'abc'"),
    (["--qrobust-device"], "qrobust run: argument --qrobust-device: expected one argument"),
])
def test_a_bad_option_of_qrobust_run_is_one_line(capsys, args, line):
    """pytest prints a bad option as its usage, the error, the ini file and the rootdir; qrobust run, one line."""
    assert main(["run", *args]) == 4
    assert capsys.readouterr().err.strip().splitlines() == [line]
