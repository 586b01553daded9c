"""Registration of the LASER entries on ``s3prl.hub``, seen from fresh interpreters.

Every check runs a subprocess, so the interpreter start-up (the installed ``.pth``) is what is tested,
not this pytest process' state. Two install modes:

- editable (``pip install -e .``, how the Makefile installs the venv running these tests): the live
  environment must carry ``s3prl_laser_startup.pth``, and s3prl's unchanged entry points must list
  ``hubert_laser`` / ``wavlm_laser``;
- regular (a wheel): ``pip wheel --no-deps`` of a copy of the project must put the ``.pth`` at the
  wheel root, and installing it into a throwaway ``--target`` directory must register the entries.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PTH_NAME = "s3prl_laser_startup.pth"
ENTRIES = ("hubert_laser", "wavlm_laser", "wav2vec2_laser", "data2vec_laser")
HEAVY = ("torch", "s3prl", "triton", "torchaudio", "numpy")


def run_python(*args: str, cwd: Path, interpreter_flags: tuple[str, ...] = ()) -> str:
    """Run a fresh interpreter of this environment; return its stdout, failing with stdout+stderr on error."""
    done = subprocess.run(
        [sys.executable, *interpreter_flags, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def listed_upstreams(help_text: str) -> set[str]:
    """Names in run_downstream's ``-u`` help ("Available options in S3PRL: [...]")."""
    listing = " ".join(help_text.split()).split("Available options in S3PRL: [", 1)[1].split("]", 1)[0]
    return {name.strip(" '") for name in listing.split(",")}


def test_startup_stays_light_and_registers_on_first_hub_import(tmp_path):
    code = f"""
import sys
heavy = [m for m in {HEAVY!r} if m in sys.modules]
assert not heavy, f"imported at start-up: {{heavy}}"
from s3prl_laser import _startup
assert _startup.installed_watcher() is not None, "no start-up hook: is {PTH_NAME} in site-packages?"
import s3prl.hub
assert _startup.installed_watcher() is None, "the hook should remove itself after registering"
assert type(s3prl.hub.__loader__).__module__ != _startup.__name__
assert {set(ENTRIES)!r} <= set(s3prl.hub.options()), s3prl.hub.options()
print("ok")
"""
    assert run_python("-c", code, cwd=tmp_path).split() == ["ok"]


def test_installed_environment_carries_the_pth():
    dist = metadata.distribution("s3prl-laser")
    installed = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    assert installed.read_bytes() == (REPO / PTH_NAME).read_bytes()
    assert PTH_NAME in {str(f) for f in dist.files}, "pip uninstall would leave the .pth behind"
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        assert Path(direct_url["url"].removeprefix("file://")).resolve() == REPO


def test_run_downstream_module_lists_the_entries(tmp_path):
    help_text = run_python("-m", "s3prl.run_downstream", "-h", cwd=tmp_path)
    assert set(ENTRIES) <= listed_upstreams(help_text)


def test_run_downstream_script_of_an_s3prl_tree_lists_the_entries():
    """``run_downstream.py`` run by path from s3prl's own folder, as SUPERB recipes are run from a checkout.

    Uses ``$S3PRL_SRC/s3prl`` when the env var names an s3prl source checkout, else the installed package's
    folder (the same file).
    """
    import importlib.util
    import os

    src = os.environ.get("S3PRL_SRC")
    folder = Path(src) / "s3prl" if src else Path(importlib.util.find_spec("s3prl").origin).parent
    help_text = run_python("run_downstream.py", "-h", cwd=folder)
    assert set(ENTRIES) <= listed_upstreams(help_text)


@pytest.mark.one_lane  # the wheel's files; registration is tested on every lane
def test_regular_wheel_puts_a_working_pth_at_its_root(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(
        REPO,
        project,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests"
        ),
    )
    run_python(
        "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), ".", cwd=project
    )
    (wheel,) = (tmp_path / "dist").glob("s3prl_laser-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(PTH_NAME) == (REPO / PTH_NAME).read_bytes()
        names = set(archive.namelist())
    # data files the package reads at run time: the C kernel source, the presets, the demo corpus
    data_files = [
        p.relative_to(REPO).as_posix()
        for pattern in ("s3prl_laser/softdtw/*.c", "s3prl_laser/assets/**/*.*")
        for p in REPO.glob(pattern)
    ]
    presets = (REPO / "upstream_configs").glob("*.yaml")
    data_files += [f"s3prl_laser/upstream_configs/{p.name}" for p in presets]
    missing = sorted(set(data_files) - names)
    assert len(data_files) > 70 and not missing, f"the wheel lacks {missing[:5]}"

    target = tmp_path / "site"
    run_python(
        "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel), cwd=tmp_path
    )
    code = f"""
import site, sys
site.addsitedir({str(target)!r})
from s3prl_laser import _startup
assert _startup.__file__.startswith({str(target)!r}), _startup.__file__
assert _startup.installed_watcher() is not None, "the wheel's .pth did not install the start-up hook"
assert "torch" not in sys.modules
site.addsitedir({sysconfig.get_paths()["purelib"]!r})  # s3prl, torch, ... of this environment
import s3prl.hub
assert {set(ENTRIES)!r} <= set(s3prl.hub.options())
assert s3prl.hub.hubert_laser.__code__.co_filename.startswith({str(target)!r})
print("ok")
"""
    assert run_python("-c", code, cwd=tmp_path, interpreter_flags=("-S",)).split() == ["ok"]


def test_install_registers_at_once_when_the_hub_is_already_imported(monkeypatch):
    import s3prl.hub

    from s3prl_laser import _startup
    from s3prl_laser.plugin import hubconf

    for name in ENTRIES:
        monkeypatch.delattr(s3prl.hub, name, raising=False)
    assert not set(ENTRIES) & set(s3prl.hub.options())
    _startup.install()
    assert _startup.installed_watcher() is None
    assert [getattr(s3prl.hub, name) for name in ENTRIES] == [getattr(hubconf, name) for name in ENTRIES]
