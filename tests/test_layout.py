"""The design card's layout: suites/ and thresholds.yaml at the repository's top level hold the only
copies, `pytest suites` in a clone collects the built-in gate exactly as `qrobust run` does, the wheel
ships both, and pytest tests stays independent of the gate's file."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which pyproject.toml admits, has no tomllib: tomli is the same parser
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).parents[1]


def test_the_suites_and_the_built_in_thresholds_exist_once_at_the_top_level():
    assert (ROOT / "thresholds.yaml").is_file() and not (ROOT / "thresholds.yaml").is_symlink()
    assert (ROOT / "suites" / "thresholds.yaml").resolve() == (ROOT / "thresholds.yaml").resolve()  # a link
    assert not (ROOT / "qrobust" / "suites").exists() and not (ROOT / "qrobust" / "thresholds.yaml").exists()


def test_the_package_list_names_every_package_folder():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qrobust").rglob("__init__.py")}
    assert set(config["packages"]) == folders | {"qrobust.suites"}
    assert config["package-dir"] == {"qrobust.suites": "suites"}


def collected(args: list[str]) -> list[str]:
    run = subprocess.run([sys.executable, *args, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return sorted(line.split("::", 1)[1] for line in run.stdout.splitlines() if "::" in line)


@pytest.mark.slow
def test_pytest_suites_in_a_clone_collects_exactly_what_qrobust_run_does():
    in_clone = collected(["-m", "pytest", "suites"])
    assert len(in_clone) > 2000 and in_clone == collected(["-m", "qrobust", "run"])


@pytest.mark.slow
def test_the_wheel_ships_the_suites_and_the_built_in_thresholds(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = zipfile.ZipFile(next(tmp_path.glob("qrobust-*.whl")))
    names = set(wheel.namelist())
    assert {"qrobust/suites/__init__.py", "qrobust/suites/test_gate.py", "qrobust/suites/thresholds.yaml"} <= names
    assert wheel.read("qrobust/suites/thresholds.yaml") == (ROOT / "thresholds.yaml").read_bytes()  # a file, not a link
    assert "qrobust/models/calibration/lenet5-digits-int8-x86.json" in names
