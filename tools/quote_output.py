"""Write the program's real output into the README and docs/, so that quoted output cannot drift.

A quote in a markdown file is a marker line followed by a ``text`` code block:

    <!-- output: demo -->
    ```text
    ...replaced by this tool...
    ```

Each marker names a command of ``COMMANDS`` below. The tool runs the named commands (all by default) from
the repository root, in the order of the table (later ones use what earlier ones wrote under ``runs/``), with
this interpreter, and replaces each block with ``$ <command>`` and the lines the command printed (standard
output and standard error together; a progress bar redrawn in place is shown once, at its end; this
checkout's absolute path is shown as ``.``). ``keep`` picks the lines worth quoting; the others are elided
as ``...``.

    python tools/quote_output.py            # every quote
    python tools/quote_output.py demo       # only the demo's
    python tools/quote_output.py --list     # the commands and where each is quoted
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- output: ([\w-]+) -->\n```text\n.*?^```\n", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Command:
    """One quoted command.

    line: what the reader types (``python`` is run as this interpreter).
    keep: a regex; only matching lines are quoted (None: every line), runs of others become one ``...``.
    start: a regex; lines before its first match are dropped (the quote starts there).
    fresh: paths under the repository removed before the command runs (it must make them itself).
    source: the name of an earlier command whose output this quote shows another part of (not run again).
    """

    line: str
    keep: str | None = None
    start: str | None = None
    fresh: tuple[str, ...] = ()
    source: str | None = None


DEMO = "python -m s3prl_laser.finetune --upstream hubert --demo --out runs/demo"
DEMO_CORPUS = "s3prl_laser/assets/demo_corpus/LibriSpeech"
COMMANDS: dict[str, Command] = {
    "demo": Command(DEMO, fresh=("runs/demo",)),
    "demo-report": Command(DEMO, start=r"^LASER demo:", source="demo"),
    "finetune-end": Command(
        DEMO, keep=r"trainable parameters|^LASER: |tuned upstream (written|at)", source="demo"
    ),
    "resume": Command(
        "python -m s3prl_laser.finetune --out runs/demo --resume steps=130 warmup_steps=125",
        keep=r"--resume|^LASER: |tuned upstream written",
    ),
    "torchrun": Command(
        "python -m torch.distributed.run --nproc_per_node 2 -m s3prl_laser.finetune --upstream hubert --demo "
        "--out runs/demo_2ranks steps=20 eval_every=0",
        keep=r"identical trainable weights|^LASER: |tuned upstream written",
        fresh=("runs/demo_2ranks",),
    ),
    "probe": Command(
        f"python -m s3prl_laser.probe --data {DEMO_CORPUS} --out runs/probe_demo "
        "--upstream hubert_local:runs/demo/tiny_hubert.pt --upstream hubert_laser:runs/demo/hubert_laser.pt "
        f"--lexicon {DEMO_CORPUS}/phonemes/lexicon.txt --steps 300",
        start=r"^upstream ",
        fresh=("runs/probe_demo",),
    ),
    "superb": Command(
        f"downstream_recipes/superb_asr.sh --upstream hubert_laser --ckpt runs/demo/hubert_laser.pt "
        f"--librispeech {DEMO_CORPUS} --out runs/superb/asr_hubert_laser --steps 4 --device cpu --smoke",
        keep=r"^SUPERB |^result:",
        fresh=("runs/superb/asr_hubert_laser",),
    ),
    "export": Command(
        "python -m s3prl_laser.export --ckpt runs/demo/hubert_laser.pt --to hf runs/hf/hubert_laser --verify",
        keep=r"^exported|^verified",
        fresh=("runs/hf/hubert_laser",),
    ),
}


def final_redraws(text: str) -> list[str]:
    """Lines as a terminal shows them at the end: of a line redrawn with carriage returns, its last state."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]


def quoted_lines(command: Command, output: str) -> list[str]:
    lines = [line.replace(str(REPO), ".") for line in final_redraws(output)]
    while lines and not lines[-1]:
        lines.pop()
    if command.start:
        first = next((i for i, line in enumerate(lines) if re.search(command.start, line)), 0)
        lines = lines[first:]
    if command.keep is None:
        return lines
    kept: list[str] = []
    for line in lines:
        if re.search(command.keep, line):
            kept.append(line)
        elif kept[-1:] != ["..."]:
            kept.append("...")
    return kept


def run(name: str, command: Command) -> str:
    """The output of ``command`` (standard output and error together); exits if it fails."""
    for path in command.fresh:
        shutil.rmtree(REPO / path, ignore_errors=True)
    argv = command.line.split()
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "COLUMNS": "110", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}
    env.pop("S3PRL_LASER_LOG", None)
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        sys.exit(f"error: `{command.line}` exited {done.returncode}; its output:\n{output[-4000:]}")
    print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return output


def quotes_in(text: str) -> list[str]:
    return MARKER.findall(text)


def write_quotes(quotes: dict[str, list[str]]) -> None:
    for document in DOCUMENTS:
        text = document.read_text()

        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in quotes:
                return match.group(0)
            return f"<!-- output: {name} -->\n```text\n" + "\n".join(quotes[name]) + "\n```\n"

        updated = MARKER.sub(replace, text)
        if updated != text:
            document.write_text(updated)
            print(f"updated {document.relative_to(REPO)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="commands to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the commands and where each is quoted")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in COMMANDS]
    if unknown:
        parser.error(f"unknown command(s) {unknown}; known: {', '.join(COMMANDS)}")
    if args.list:
        for name, command in COMMANDS.items():
            where = [d.relative_to(REPO).as_posix() for d in DOCUMENTS if name in quotes_in(d.read_text())]
            print(f"{name:16} {command.line}\n{'':16} quoted in: {', '.join(where) or 'nowhere'}")
        return 0
    names = args.names or list(COMMANDS)
    outputs: dict[str, str] = {}
    quotes = {}
    for name, command in COMMANDS.items():
        if name not in names:
            continue
        if command.source is None:
            outputs[name] = run(name, command)
        elif command.source not in outputs:
            outputs[command.source] = run(command.source, COMMANDS[command.source])
        output = outputs[command.source or name]
        quotes[name] = [f"$ {command.line}", *quoted_lines(command, output)]
    write_quotes(quotes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
