"""Packaging: every folder with an __init__.py is installed, under the musc_edge namespace only."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:   # Python 3.10: tomli, where installed
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed_under_the_namespace():
    tool = _setuptools()
    listed = set(tool["packages"])
    for name, folder in tool["package-dir"].items():
        assert name.startswith("musc_edge.")
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            package = ".".join((name, *init.parent.relative_to(ROOT / folder).parts))
            assert package in listed, f"{package} ({init.parent}) is missing from pyproject.toml's packages"


def test_console_scripts_point_into_the_namespace():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and all(target.startswith("musc_edge.") for target in scripts.values())


def test_the_installed_code_is_this_checkout():
    musc_edge = pytest.importorskip("musc_edge.edge")
    assert Path(musc_edge.__file__).resolve().parent == ROOT / "edge_app", (
        "musc_edge.edge is installed from another checkout: pip install -e . here")
