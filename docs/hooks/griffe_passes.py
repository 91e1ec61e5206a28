"""Griffe extensions for the API pages (mkdocs.yml loads them via mkdocstrings).

- :class:`PassesSubpackage`: the package maps the top-level ``passes/`` folder to
  ``masasurgery.passes`` (``package-dir`` in pyproject.toml). Griffe finds a
  package's submodules in its own folder, so without this it cannot see
  ``masasurgery.passes`` and fails on the names ``masasurgery`` re-exports from it
  (``plan_of``, ``rebuild``, ``RewritePlan``).
- :class:`DocstringMarkup`: the docstrings open their doctests with ``Example:``
  (Google style allows it); Griffe knows only ``Examples:`` as the section whose
  ``>>>`` lines are code, and would render the others as prose, where an output
  such as ``[4]`` reads as a broken link. And they name other objects with Sphinx
  roles (``:func:`convert```), which Markdown shows as written; they become inline
  code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import griffe

__all__ = ["DocstringMarkup", "PassesSubpackage"]

_PASSES = Path(__file__).resolve().parents[2] / "passes" / "__init__.py"
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc):`~?([^`]+)`")


class PassesSubpackage(griffe.Extension):
    """Attach ``passes/`` to the ``masasurgery`` package as its ``passes``."""

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        if pkg.path != "masasurgery" or "passes" in pkg.members:
            return
        passes = loader._load_module("passes", _PASSES, submodules=True, parent=pkg)
        pkg.set_member("passes", passes)


class DocstringMarkup(griffe.Extension):
    """``Example:`` read as ``Examples:``; Sphinx roles as inline code."""

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
                obj.docstring.value = _ROLE.sub(r"`\1`", text)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)
