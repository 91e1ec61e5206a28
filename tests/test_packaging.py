"""pyproject.toml ships every subpackage: an editable install hides a missing one."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _on_disk() -> set[str]:
    # Every folder with an __init__.py, named as the installed package
    names = set()
    for package, folder in _config()["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            names.add(".".join((package, *parts)))
    return names


def test_every_subpackage_is_listed():
    listed = set(_config()["packages"])
    missing = _on_disk() - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages"


def test_no_top_level_passes_package():
    # passes/ installs as masasurgery.passes, never as a top-level "passes"
    assert "passes" not in _config()["packages"]
    assert _config()["package-dir"]["masasurgery.passes"] == "passes"


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert scripts["scripts"]["masasurgery"] == "masasurgery.cli:main"
