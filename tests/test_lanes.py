"""Packaging across the lanes: installing never changes the user's stack; a stack that cannot run is one line.

- setup.cfg: the plain install requires what our code imports and nothing else (no s3prl distribution, no
  torchaudio) and bounds nothing from above; each lane has its extra, and the error message names them.
- pip itself, asked what installing this project into the running environment would do (``--dry-run``),
  installs none of the lane's packages and no s3prl distribution.
- An environment really without s3prl (this one's packages minus s3prl) gets the message, not a traceback;
  so do a Python without torch (every entry point, even ``--help``) and a torchaudio that cannot load.
"""

import ast
import configparser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from s3prl_laser import stacks
from s3prl_laser.stacks import LANES

pytestmark = pytest.mark.espnet_lane

REPO = Path(__file__).resolve().parents[1]
LANE_PACKAGES = {"torch", "torchaudio", "transformers", "huggingface-hub", "numpy"}
S3PRL_DISTRIBUTIONS = {"s3prl", "espnet-s3prl"}
# import name -> distribution, where they differ
DISTRIBUTION_OF = {"yaml": "pyyaml"}
# imported by our code only where present (guarded) or brought by another requirement: never required by us
NOT_REQUIRED = {"s3prl", "torchaudio", "huggingface_hub", "torchcodec", "triton"}
ENTRY_POINTS = ["finetune", "export", "manifest", "fixtures", "probe"]


def canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def requirements(section: str, key: str) -> dict[str, Requirement]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = [line for line in parser[section][key].splitlines() if line.strip() and not line.startswith("#")]
    return {canonical(req.name): req for req in map(Requirement, lines)}


def test_plain_install_names_no_s3prl_and_bounds_nothing_from_above():
    required = requirements("options", "install_requires")
    assert not S3PRL_DISTRIBUTIONS & set(required), "a plain install would put a second s3prl over the user's"
    assert "torchaudio" not in required, "a torchaudio built for another torch breaks every import of it"
    for name, req in required.items():
        for spec in req.specifier:
            assert spec.operator == ">=", f"{name}{spec}: would downgrade or replace a user's newer release"


def third_party_imports() -> set[str]:
    """Top-level names of the modules that s3prl_laser's code imports, minus the standard library's."""
    names = set()
    for path in (REPO / "s3prl_laser").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"s3prl_laser", "__future__"}


def test_plain_install_requires_exactly_what_our_code_imports():
    required = set(requirements("options", "install_requires"))
    imported = {canonical(DISTRIBUTION_OF.get(name, name)) for name in third_party_imports() - NOT_REQUIRED}
    assert required == imported


def test_each_lane_has_an_extra_and_the_error_names_it():
    current = requirements("options.extras_require", "current")
    classic = requirements("options.extras_require", "classic")
    assert "espnet-s3prl" in current and "s3prl" not in current
    assert all(spec.operator == ">=" for req in current.values() for spec in req.specifier)
    assert str(classic["s3prl"].specifier) == "==0.4.18" and "espnet-s3prl" not in classic
    for torch_release, lane in (("2.14.1", current), ("2.8.0", classic)):
        assert lane["torch"].specifier.contains(torch_release)
    assert not classic["torchaudio"].specifier.contains("2.9.0")  # s3prl 0.4.18 calls set_audio_backend
    assert not classic["huggingface-hub"].specifier.contains("1.0.0")  # its runner imports HfFolder
    assert LANES["current"].install == "pip install 's3prl-laser[current]'"
    assert LANES["classic"].install == "pip install 's3prl-laser[classic]'"


@pytest.mark.slow
def test_pip_installs_none_of_the_lane_packages_into_this_environment(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(
        REPO,
        project,
        ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__"),
    )
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-qq", "--dry-run", "--report", str(report), str(project)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    installs = json.loads(report.read_text())["install"]
    would_install = {canonical(item["metadata"]["name"]) for item in installs}
    assert "s3prl-laser" in would_install
    assert not would_install & (LANE_PACKAGES | S3PRL_DISTRIBUTIONS), would_install


def site_without_s3prl(root: Path) -> Path:
    """A folder with links to everything this environment imports from, except the s3prl package."""
    import torch

    site = root / "site"
    site.mkdir()
    folders = {Path(torch.__file__).parents[1], REPO}
    for folder in folders:
        for entry in folder.iterdir():
            name = entry.name.lower()
            if name == "s3prl" or name.startswith(("s3prl-", "s3prl_0", "espnet_s3prl")):
                continue
            if not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return site


def test_missing_s3prl_names_both_install_commands(tmp_path):
    site = site_without_s3prl(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-S", "-m", "s3prl_laser.finetune", "--upstream", "hubert", "--demo",
         "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "s3prl is not installed" in done.stderr
    for lane in LANES.values():
        assert lane.install in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def run_entry_point(module: str, *args: str, python_flags: tuple[str, ...] = (), **env: str):
    return subprocess.run(
        [sys.executable, *python_flags, "-m", f"s3prl_laser.{module}", *args],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_python_without_torch_says_which_environment_to_use(module):
    # -S: no site-packages, so this interpreter finds the repository (PYTHONPATH) but no torch, yaml, ...
    done = run_entry_point(module, "--help", python_flags=("-S",), PYTHONPATH=str(REPO))
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: python -m s3prl_laser.{module} needs torch")
    assert "activate" in line and LANES["current"].install in line
    assert done.stdout == ""


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_imports_no_torch(module):
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('s3prl_laser.{module}', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = {'torch', 'torchaudio', 's3prl', 'transformers', 'numpy', 'yaml'} & set(sys.modules)\n"
        "print('HEAVY', sorted(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert done.stdout.splitlines()[-1] == "HEAVY []"


def test_a_torchaudio_that_cannot_load_is_one_message_with_the_fix(tmp_path):
    fake = tmp_path / "fake" / "torchaudio"  # what torch 2.12 + torchaudio 2.11.1 raises at import
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise OSError('Could not load this library: /site/torchaudio/lib/libtorchaudio.so: '\n"
        "              'undefined symbol: torch_exception_get_what_without_backtrace')\n"
    )
    out = tmp_path / "run"
    done = run_entry_point(
        "finetune", "--upstream", "hubert", "--demo", "--out", str(out), PYTHONPATH=str(tmp_path / "fake")
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    torch_version = importlib.metadata.version("torch")
    assert line.startswith("error: torchaudio ") and f"with torch {torch_version}" in line
    assert "undefined symbol" in line and "pairs that work: torch 2.6 + torchaudio 2.6.*" in line
    assert "Fix: pip install" in line
    assert not out.exists()
    # the package itself, and code that does not need torchaudio, still import
    code = "import s3prl_laser, s3prl_laser.softdtw, s3prl_laser.data, s3prl_laser.export"
    works = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert works.returncode == 0, works.stderr


@pytest.mark.parametrize(
    ("torch_version", "fix"),
    [
        ("2.8.0", 'pip install "torchaudio==2.8.*"'),
        ("2.12.1", 'pip install "torchaudio==2.11.0"'),  # ESPnet 202511's torch: torch stays
        ("2.13.0", 'pip install "torch==2.14.*" "torchaudio==2.11.0"'),  # none known: torch moves
    ],
)
def test_the_fix_names_the_torchaudio_built_for_the_installed_torch(monkeypatch, torch_version, fix):
    versions = {"torch": torch_version, "torchaudio": "2.11.1"}
    monkeypatch.setattr(stacks, "_version", versions.get)
    message = stacks.torchaudio_message(OSError("undefined symbol: x"))
    assert f"torchaudio 2.11.1 cannot be imported with torch {torch_version}" in message
    assert message.split("Fix: ")[1].startswith(fix)
