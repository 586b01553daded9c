"""Every command in the README's and docs/' shell blocks names a real entry point and real flags.

A renamed flag, a removed config key or a moved script then fails here instead of in a reader's terminal.
Checked: `python -m s3prl_laser.X ...` (also through `torchrun`/`python -m torch.distributed.run` and any
`.venv*/bin/python`), `python benchmarks/X.py ...`, `downstream_recipes/*.sh|*.py ...`, `tools/X.py ...` and
`make TARGET`. Flags must be known to the entry point's own argument parser; `key=value` words given to the
fine-tuning command must be config keys.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.one_lane  # the documents' commands, checked against our parsers

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.MULTILINE | re.DOTALL)
PYTHON = re.compile(r"^(?:\S*/)?python3?$")
LAUNCHER_VALUE_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
                        "--rdzv_endpoint", "--rdzv_backend", "--rdzv_id", "--max_restarts"}


def shell_commands(text: str) -> list[str]:
    """The commands of every shell block of a markdown text: continuations joined, comments cut."""
    commands = []
    for block in SHELL_BLOCK.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in re.split(r"\s(?:&&|\|\||;)\s", line) if part.strip())
    return commands


def words_of(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if "|" in words:
        words = words[: words.index("|")]
    return words


def entry_point(words: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, name, arguments) of a command this project provides, or None for anyone else's command."""
    if not words:
        return None
    if words[0] == "make":
        return "make", "make", words[1:]
    if words[0] in ("torchrun", "srun"):
        rest = words[1:]
        if words[0] == "srun":  # srun [opts] torchrun ... / srun [opts] python -m ...
            while rest and rest[0].startswith("-"):
                rest = rest[1:]
            return entry_point(rest)
        return launched_module(rest)
    if PYTHON.match(words[0]):
        rest = words[1:]
        if rest[:2] == ["-m", "torch.distributed.run"]:
            return launched_module(rest[2:])
        if rest[:1] == ["-m"] and rest[1].startswith("s3prl_laser"):
            return "module", rest[1], rest[2:]
        if rest and rest[0].endswith(".py") and (REPO / rest[0]).is_file():
            return "script", rest[0], rest[1:]
        return None
    path = words[0].removeprefix("./")
    if path.startswith(("downstream_recipes/", "tools/", "benchmarks/")):
        return "script", path, words[1:]
    return None


def launched_module(words: list[str]) -> tuple[str, str, list[str]] | None:
    """torchrun's own options skipped: the module it starts, with its arguments."""
    index = 0
    while index < len(words) and words[index] != "-m":
        flag = words[index].split("=")[0]
        index += 2 if flag in LAUNCHER_VALUE_FLAGS and "=" not in words[index] else 1
    if index + 1 >= len(words) or not words[index + 1].startswith("s3prl_laser"):
        return None
    return "module", words[index + 1], words[index + 2:]


def parser_of(kind: str, name: str):
    if kind == "module":
        module = importlib.import_module(name)
        if not hasattr(module, "get_args_parser"):
            module = importlib.import_module(name + ".__main__")
        return module.get_args_parser()
    path = REPO / name
    assert path.is_file(), f"{name} does not exist"
    if path.suffix == ".sh":  # the SUPERB wrappers pass everything to superb.py TASK
        task = re.search(r"superb\.py\"? (\w+)", path.read_text())
        assert task, f"{name}: cannot tell which entry point it runs"
        return load_script(REPO / "downstream_recipes/superb.py").get_args_parser(task.group(1))
    return load_script(path).get_args_parser()


def load_script(path: Path):
    """A script loaded as a module, its own folder importable as when it runs (its sibling imports)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"docs_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def unknown_words(kind: str, name: str, arguments: list[str]) -> list[str]:
    if kind == "make":
        targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
        return [word for word in arguments if "=" not in word and word not in targets]
    parser = parser_of(kind, name)
    options = parser._option_string_actions  # noqa: SLF001 (argparse has no public list of its flags)
    unknown = [word for word in arguments if word.startswith("-") and word.split("=")[0] not in options]
    if name == "s3prl_laser.finetune":
        from s3prl_laser.training.config import LaserConfig

        keys = {field.name for field in dataclasses.fields(LaserConfig)}
        overrides = [word for word in arguments if re.fullmatch(r"[a-z_]+=.*", word)]
        unknown += [word for word in overrides if word.split("=")[0] not in keys]
    return unknown


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for command in shell_commands(document.read_text()):
            if entry_point(words_of(command)) is not None:
                found.append((document.relative_to(REPO).as_posix(), command))
    return found


COMMANDS = documented_commands()


def test_documents_show_our_commands():
    documents = {document for document, _ in COMMANDS}
    assert "README.md" in documents
    assert sum(command.count("s3prl_laser.finetune") for _, command in COMMANDS) >= 3


@pytest.mark.parametrize(("document", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_command_names_real_entry_point_and_flags(document, command):
    kind, name, arguments = entry_point(words_of(command))
    unknown = unknown_words(kind, name, arguments)
    assert not unknown, f"{document}: `{command}` uses {unknown}, which {name} does not know"


def test_checker_catches_a_wrong_flag_and_key():
    """The checker itself fails on a misspelt flag and an unknown config key."""
    kind, name, arguments = entry_point(words_of(
        "torchrun --nproc_per_node 2 -m s3prl_laser.finetune --upstrem hubert --out r stepz=3"))
    assert unknown_words(kind, name, arguments) == ["--upstrem", "stepz=3"]
    kind, name, arguments = entry_point(words_of("make tset"))
    assert unknown_words(kind, name, arguments) == ["tset"]


def test_every_quote_is_made_by_the_quote_tool():
    """Quoted output blocks name a command of tools/quote_output.py, and each of its commands is quoted."""
    tool = load_script(REPO / "tools/quote_output.py")
    quoted = {name for document in DOCUMENTS for name in tool.quotes_in(document.read_text())}
    assert quoted <= set(tool.COMMANDS), f"quotes no command makes: {quoted - set(tool.COMMANDS)}"
    assert set(tool.COMMANDS) <= quoted, f"commands quoted nowhere: {set(tool.COMMANDS) - quoted}"
    for command in tool.COMMANDS.values():
        kind, name, arguments = entry_point(words_of(command.line))
        assert not unknown_words(kind, name, arguments), command.line


def test_quote_tool_shows_a_redrawn_bar_once_and_elides():
    tool = load_script(REPO / "tools/quote_output.py")
    output = f"a {REPO}/x\nbar  10%\rbar  50%\rbar 100%\nnoise\nnoise\nresult 1\n\n"
    command = tool.Command("python -m s3prl_laser.finetune --help", keep=r"^(a|bar|result)")
    assert tool.quoted_lines(command, output) == ["a ./x", "bar 100%", "...", "result 1"]
