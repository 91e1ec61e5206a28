"""The docs run: every ```python block of every page, and the site builds strict.

Convention for docs pages (docs/**/*.md):

- A block fenced ```python runs. The blocks of one page run in order, in one
  namespace, in a fresh temporary working directory, so a later block may use
  what an earlier one defined and files a page writes go nowhere else.
- A block that must not run is fenced as what it is: ```text (output, signatures,
  pseudo-code), ```bash / ```console (shell), ```json, ```yaml. Never ```py or
  ```python3: they would be skipped silently, so this file rejects them.
- Keep a page fast (a few seconds): tiny models built from configs (timm
  ``vit_tiny_patch16_224`` with ``depth=3..6, img_size=32, patch_size=8``;
  transformers configs with 2-4 layers of width 32-64), no downloads.

Each page is its own test (``test_page_runs[recipes/gpt2.md]``).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import masasurgery

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# A fence at any indentation (inside a list or an admonition), then its body up to
# the closing fence at the same indentation
_FENCE = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```", flags=re.S | re.M)
_AMBIGUOUS = re.compile(r"^[ \t]*```(py|python3|pycon)\b", flags=re.M)


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a page, dedented, in order."""
    return [textwrap.dedent(body) for _, body in _FENCE.findall(path.read_text())]


def _pages() -> list[str]:
    return sorted(
        str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if python_blocks(p)
    )


PAGES = _pages()


@pytest.fixture
def global_tables():
    """Pages may extend masasurgery's tables, registries and logging; undo that after.

    In place: other modules hold the same list and dicts by reference.
    """
    from masasurgery.passes.capture import CAPTURE_PATHS
    from masasurgery.passes.layouts import LAYOUTS
    from masasurgery.passes.structure import RULES

    tables = [RULES, LAYOUTS, CAPTURE_PATHS, _timm_leaves()]
    saved = [table.copy() for table in tables]
    loggers = [logging.getLogger(), logging.getLogger("masasurgery")]
    levels = [(lg.level, list(lg.handlers)) for lg in loggers]
    yield
    for lg, (level, handlers) in zip(loggers, levels, strict=True):
        lg.setLevel(level)
        lg.handlers[:] = handlers
    for table, copy in zip(tables, saved, strict=True):
        table.clear()
        if isinstance(table, list):
            table.extend(copy)
        else:
            table.update(copy)


def _timm_leaves() -> set:
    if importlib.util.find_spec("timm") is None:
        return set()
    from timm.layers import _fx

    return _fx._leaf_modules


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page, tmp_path, monkeypatch, global_tables):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs.{page}"}
    for i, block in enumerate(python_blocks(DOCS / page)):
        code = compile(block, f"docs/{page} (python block {i + 1})", "exec")
        exec(code, namespace)  # noqa: S102


def test_the_recipes_are_among_the_pages_that_run():
    # Guards the block pattern: a change that finds no blocks must not pass quietly
    expected = {
        "quickstart.md",
        "concepts.md",
        "custom.md",
        "persistence.md",
        "recipes/timm.md",
        "recipes/torchvision.md",
        "recipes/bert.md",
        "recipes/gpt2.md",
        "recipes/llama.md",
        "recipes/layouts.md",
        "recipes/leaf-modules.md",
        "recipes/structure.md",
        "recipes/spectrum.md",
    }
    assert expected <= set(PAGES), sorted(expected - set(PAGES))


def test_no_page_hides_python_behind_another_fence():
    offenders = [
        f"{p.relative_to(DOCS)}: {m.group(0).strip()}"
        for p in sorted(DOCS.rglob("*.md"))
        for m in _AMBIGUOUS.finditer(p.read_text())
    ]
    assert not offenders, (
        f"fence these as ```python (runs) or ```text (does not): {offenders}"
    )


def test_every_public_name_has_an_api_entry():
    # Resolved as mkdocstrings does, a submodule first: `::: masasurgery.convert`
    # is the module masasurgery/convert.py, not the function
    api = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    paths = re.findall(r"^::: (masasurgery[\w.]*)$", api, flags=re.M)
    documented = {id(_resolve(path)) for path in paths}
    public = {name: getattr(masasurgery, name) for name in masasurgery.__all__}
    missing = [name for name, obj in public.items() if id(obj) not in documented]
    assert not missing, (
        f"add `::: masasurgery.<name>` (`::: masasurgery.<module>.<name>` where a "
        f"module has the same name) to a page of docs/api/: {missing}"
    )


def _resolve(path: str) -> object:
    """The object a `::: path` entry renders; None when it resolves to nothing (the
    strict site build reports those)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
        return obj
    return None


def test_the_signature_list_matches_the_code():
    text = (DOCS / "api" / "index.md").read_text()
    listing = re.search(r"```text\n(.*?)```", text, flags=re.S).group(1)
    entries = re.findall(r"masasurgery\.(\w+)\((.*?)\) ->", listing, flags=re.S)
    assert len(entries) >= 10
    for name, params in entries:
        params = re.sub(r"\([^()]*\)", "", params)  # defaults such as ("q", "k")
        listed = [p.split("=")[0].strip() for p in params.split(",")]
        listed = [p for p in listed if p not in ("", "*")]
        actual = list(inspect.signature(getattr(masasurgery, name)).parameters)
        assert listed == actual, f"docs/api/index.md lists {name}({listed})"


def test_the_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", tmp_path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "index.html").exists()
    assert (tmp_path / "api" / "convert" / "index.html").exists()
