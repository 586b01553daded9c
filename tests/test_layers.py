"""The package's layers hold: every module's imports against the layer table of docs/development.md.

The tables are read from the document (section "Layout: the package in layers"), the imports from the source
(AST: top-level imports and those inside functions, relative ones resolved), so the document, the test and
the tree cannot drift apart. A module imports modules of its own layer and of lower layers only;
``s3prl.upstream`` and ``transformers`` are imported only where the second table says.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "s3prl_laser"
DOC = REPO / "docs" / "development.md"
SECTION = "## Layout: the package in layers"


def doc_tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of the layout section, each a list of rows of cells (header and rule dropped)."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    tables, current = [], None
    for line in text[start : end if end != -1 else None].splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
                current.append(None)  # the header
            elif not set("".join(cells)) <= set("-: "):
                current.append(cells)
        else:
            current = None
    return [[row for row in table if row is not None] for table in tables]


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def layer_table(text: str) -> dict[str, int]:
    """``{entry: layer}``: ``folder/`` for every module under it, ``name`` or ``folder/name`` for one."""
    table = next(t for t in doc_tables(text) if t and t[0][0].isdigit())
    return {entry: int(row[0]) for row in table for entry in names(row[1])}


def import_rules(text: str) -> list[tuple[str, list[str], list[str]]]:
    """``(guarded import prefix, entries allowed to import it, prefixes not counted)`` per row."""
    table = next(t for t in doc_tables(text) if t and t[0][0].startswith("`") and len(t[0]) == 3)
    return [(names(row[0])[0], names(row[1]), names(row[2])) for row in table]


def package_modules() -> dict[str, Path]:
    """``{module id: file}``, the id being the path below ``s3prl_laser/`` without ``.py``."""
    return {p.relative_to(PACKAGE).with_suffix("").as_posix(): p for p in sorted(PACKAGE.rglob("*.py"))}


def entry_of(module: str, entries) -> str | None:
    """The table entry ``module`` falls under: its own name first, else its folder's."""
    if module in entries:
        return module
    folder = module.rsplit("/", 1)[0] + "/" if "/" in module else None
    return folder if folder in entries else None


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in the file; ``from X import y`` gives ``X.y``."""
    package = ["s3prl_laser", *module.split("/")[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names]
    return found


def our_module(dotted: str, modules) -> str | None:
    """The module id an import of ``s3prl_laser...`` loads (the longest existing module or package)."""
    parts = dotted.split(".")
    if parts[0] != "s3prl_laser":
        return None
    for end in range(len(parts), 0, -1):
        inner = parts[1:end]
        for candidate in ("/".join(inner), "/".join([*inner, "__init__"])):
            if candidate in modules:
                return candidate
    return "__init__"


def violations(text: str, modules: dict[str, Path]) -> list[str]:
    layers, rules = layer_table(text), import_rules(text)
    problems = []
    for module, path in modules.items():
        entry = entry_of(module, layers)
        if entry is None:
            continue  # reported by test_every_module_is_in_the_table
        where = f"s3prl_laser/{module}.py"
        for line, dotted in imports(module, path):
            target = our_module(dotted, modules)
            if target is not None:
                target_entry = entry_of(target, layers)
                if target_entry is not None and layers[target_entry] > layers[entry]:
                    problems.append(
                        f"{where}:{line} imports {dotted} (layer {layers[target_entry]}, `{target_entry}`) "
                        f"from layer {layers[entry]} (`{entry}`): a module imports its own layer and lower "
                        "ones only (docs/development.md, Layout)"
                    )
            for prefix, allowed, exempt in rules:
                guarded = dotted == prefix or dotted.startswith(prefix + ".")
                exempted = any(dotted == e or dotted.startswith(e + ".") for e in exempt)
                if guarded and not exempted and entry_of(module, allowed) is None:
                    problems.append(
                        f"{where}:{line} imports {dotted}: only {', '.join(allowed)} may import {prefix} "
                        "(docs/development.md, Layout)"
                    )
    return problems


def test_every_module_is_in_the_table_and_every_row_names_modules():
    layers, modules = layer_table(DOC.read_text()), package_modules()
    assert len(set(layers.values())) >= 8, layers  # the table was found and read
    unplaced = [m for m in modules if entry_of(m, layers) is None]
    assert not unplaced, f"modules in no row of the layer table (docs/development.md): {unplaced}"
    empty = [e for e in layers if not any(entry_of(m, layers) == e for m in modules)]
    assert not empty, f"table entries that name no module of s3prl_laser/: {empty}"
    for prefix, allowed, _ in import_rules(DOC.read_text()):
        assert all(any(entry_of(m, [a]) for m in modules) for a in allowed), (prefix, allowed)


def test_no_module_imports_a_higher_layer_or_another_rooms_internals():
    problems = violations(DOC.read_text(), package_modules())
    assert not problems, "\n".join(problems)


def test_folder_docstrings_name_their_layer():
    layers = layer_table(DOC.read_text())
    for entry, layer in layers.items():
        if entry.endswith("/"):
            doc = ast.get_docstring(ast.parse((PACKAGE / entry / "__init__.py").read_text()))
            assert f"Layer {layer}, ``{entry[:-1]}``" in doc, (entry, layer, doc)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("softdtw/api", "from s3prl_laser.training.config import LaserConfig\n", "layer 7, `training/`"),
        ("objective/loss", "def f():\n    from ..data import read_audio\n", "layer 3, `data`"),
        ("errors", "import s3prl_laser.stacks, s3prl_laser.console\n", None),
        ("data", "from s3prl.upstream.wavlm.WavLM import WavLM\n", "only models/, plugin/hubconf"),
        ("training/parts", "from transformers import WavLMModel\n", "only models/ may import transformers"),
        ("console", "from transformers.utils import logging\n", None),
        ("models/upstream", "from s3prl.upstream.utils import merge_with_parent\n", None),
    ],
)
def test_the_check_catches_what_it_should(tmp_path, module, source, expected):
    """The checker itself, on one planted file each: an upward import, a relative one inside a function,
    a same-layer one, s3prl's and transformers' insides in and out of their place."""
    planted = tmp_path / f"{module}.py"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text(source)
    modules = {**package_modules(), module: planted}
    problems = [p for p in violations(DOC.read_text(), modules) if p.startswith(f"s3prl_laser/{module}.py:")]
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_layer_zero_and_the_config_import_no_torch():
    """Layer 0, the config (which every command's parser and checks use) and the fixtures command's module
    are torch-free: their constants come from ``names``, not from modules that import torch."""
    modules = ["names", "errors", "console", "stacks", "training.config", "fixtures", "models.tiny"]
    code = "import sys\n" + "".join(f"import s3prl_laser.{m}\n" for m in modules)
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 's3prl')))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
