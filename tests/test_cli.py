"""The ``qrobust`` command as a new user meets it after ``pip install qrobust``, from an empty folder."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_pytest_xdist_comes_with_qrobust():
    """The README's `-n 4`: a plain `pip install qrobust` must bring pytest-xdist."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"pytest-xdist\b", d) for d in project["dependencies"])
