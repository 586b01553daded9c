"""Packaging across the two lanes: installing never changes the user's stack; no s3prl gives a clear error.

- setup.cfg: the plain install names no s3prl distribution and bounds no lane package from above; each lane
  has its extra, and the error message's commands name those extras.
- pip itself, asked what installing this project into the running environment would do (``--dry-run``),
  installs none of the lane's packages and no s3prl distribution.
- An environment really without s3prl (this one's packages minus s3prl) gets the message, not a traceback.
"""

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from s3prl_laser.lanes import LANES

REPO = Path(__file__).resolve().parents[1]
LANE_PACKAGES = {"torch", "torchaudio", "transformers", "huggingface-hub", "numpy"}
S3PRL_DISTRIBUTIONS = {"s3prl", "espnet-s3prl"}


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
    for name in LANE_PACKAGES:
        assert name in required, name
        for spec in required[name].specifier:
            assert spec.operator == ">=", f"{name}{spec}: would downgrade or replace a user's newer release"


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
