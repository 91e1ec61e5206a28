"""The Python code blocks of the docs run, so the recipes cannot rot."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNNABLE = ["custom.md"]


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("name", RUNNABLE)
def test_doc_code_blocks_run_in_order(name):
    blocks = _blocks(DOCS / name)
    assert blocks, f"no python code block in docs/{name}"
    namespace: dict = {"__name__": f"docs_{name}"}
    for block in blocks:
        exec(compile(block, f"docs/{name}", "exec"), namespace)  # noqa: S102
