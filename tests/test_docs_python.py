"""The Python blocks of README.md and docs/*.md run as a reader would run them.

Every block's imports are checked on every lane (a renamed module or a name imported from the wrong one
fails here first). Then every block runs, in a fresh folder holding the files it names (the tiny models
stand in for real ones), except those in :data:`IMPORTS_ONLY`, which need what a test cannot have.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

# (document, block number in it) -> why the block is import-checked only
IMPORTS_ONLY = {
    ("docs/export.md", 0): "needs an exported folder hf/hubert_laser and a waveform `wav` of the reader's",
}
# (document, block number) -> {file the block reads: session fixture that gives a stand-in}
FILES = {
    ("docs/development.md", 0): {"tiny_hubert.pt": "tiny_hubert_ckpt"},
    ("docs/recipes.md", 0): {"runs/demo/hubert_laser.pt": "tiny_hubert_ckpt"},
}


def python_blocks() -> list[tuple[str, int, str]]:
    """``(document, number, code)`` of every Python block of the README and docs/."""
    blocks = []
    for document in DOCUMENTS:
        for number, code in enumerate(PYTHON_BLOCK.findall(document.read_text())):
            blocks.append((document.relative_to(REPO).as_posix(), number, code))
    return blocks


BLOCKS = python_blocks()
IDS = [f"{document}#{number}" for document, number, _ in BLOCKS]
RUNNABLE = [block for block in BLOCKS if block[:2] not in IMPORTS_ONLY]


def imported_names(code: str) -> list[tuple[str, str | None]]:
    """``(module, name or None)`` of every import statement of ``code``."""
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_the_documents_have_python_blocks_and_every_listed_block_exists():
    assert len(BLOCKS) >= 5, IDS  # the pattern still finds the blocks
    known = {(document, number) for document, number, _ in BLOCKS}
    assert set(IMPORTS_ONLY) <= known and set(FILES) <= known, (set(IMPORTS_ONLY) | set(FILES)) - known


@pytest.mark.espnet_lane
@pytest.mark.parametrize(("document", "number", "code"), BLOCKS, ids=IDS)
def test_every_import_of_a_block_resolves(document, number, code):
    for module, name in imported_names(code):
        statement = f"import {module}" if name is None else f"from {module} import {name}"
        try:
            exec(statement, {})
        except ImportError as error:
            pytest.fail(f"{document}, Python block {number}: `{statement}` fails: {error}")


@pytest.mark.parametrize(("document", "number", "code"), RUNNABLE, ids=[f"{d}#{n}" for d, n, _ in RUNNABLE])
def test_every_block_runs(document, number, code, tmp_path, monkeypatch, request):
    for name, fixture in FILES.get((document, number), {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(request.getfixturevalue(fixture), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{document}, Python block {number}", "exec"), {"__name__": "__doc_block__"})
