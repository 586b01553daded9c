"""User mistakes and damaged files, made for real: one line naming the file or key, exit 2, no traceback.

Each test makes the mistake the way a user makes it (a broken YAML file, a checkpoint cut short by an
interrupted download, bytes corrupted on disk, an output path that is a file, a recipe started without
its environment) and checks the exit status, that the message names the file or key, and that no
"Traceback" is printed. The last tests run two gloo processes on the CPU (the environment torchrun gives
each process) with a fault injected into one of them: a bug keeps its traceback and every process stops
within seconds; a stop signal on one process makes all of them save and exit with 128 + signal.
"""

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import warm_processes

from s3prl_laser.export import main as export_main
from s3prl_laser.finetune import main
from s3prl_laser.training import checkpoints

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "downstream_recipes"
FAST = ["batch_size=2", "max_seconds=1.0", "num_workers=0", "warmup_steps=1", "lr=1e-3", "log_every=1"]


def finetune_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "s3prl_laser.finetune", "--upstream", "hubert", *args, *FAST]
    return warm_processes.run(command, capture_output=True, text=True, timeout=300)


def error_line(output: str, returncode: int, *names) -> str:
    """The one line of ``output`` holding every name; checks exit status 2 and that no traceback came."""
    assert returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if all(str(name) in line for name in names)]
    assert lines, f"no line names all of {names}:\n{output}"
    return lines[0]


def truncated_copy(source: Path, path: Path) -> Path:
    """``source`` cut to half its size, as an interrupted download or copy leaves it."""
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupted_copy(source: Path, path: Path) -> Path:
    """``source`` with 64 bytes inverted inside the data of its largest zip member (a disk fault)."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        member = max(archive.infolist(), key=lambda info: info.compress_size)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len + member.compress_size // 2
    data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
    path.write_bytes(bytes(data))
    return path


class RunsCode:
    """Pickles as a call of ``os.system``: what a malicious checkpoint holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# ------------------------------------------------------------------------------------------ finetune
def test_config_with_a_yaml_syntax_error_names_file_line_and_column(tmp_path, tiny_hubert_ckpt, demo_corpus):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 10\nlr: [1e-4\nbatch_size: 2\n")  # the list is never closed
    inputs = ["--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus), "--out", str(tmp_path / "run")]
    result = finetune_cli("--config", str(config), *inputs)
    line = error_line(result.stdout + result.stderr, result.returncode, config, "line 3, column 11")
    assert "YAML syntax error" in line
    assert not (tmp_path / "run").exists()


def test_truncated_ckpt_is_called_damaged_before_the_data_is_scanned(tmp_path, tiny_hubert_ckpt):
    ckpt = truncated_copy(tiny_hubert_ckpt, tmp_path / "hubert_base_ls960.pt")
    # --data names a corpus that does not exist: the checkpoint is checked first
    inputs = ["--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "run")]
    result = finetune_cli("--ckpt", str(ckpt), *inputs)
    line = error_line(result.stdout + result.stderr, result.returncode, ckpt, "is damaged")
    assert "download it or produce it again" in line


def test_ckpt_corrupted_on_disk_is_caught_by_its_checksums(tmp_path, tiny_hubert_ckpt, demo_corpus, caplog):
    ckpt = corrupted_copy(tiny_hubert_ckpt, tmp_path / "hubert.pt")
    torch.load(ckpt, weights_only=True)  # torch alone reads the corrupted weights back without a word
    out = tmp_path / "run"
    code = main(["--upstream", "hubert", "--ckpt", str(ckpt), "--data", str(demo_corpus), "--out", str(out)])
    line = error_line(caplog.text, code, ckpt, "checksum mismatch")
    assert "download it or produce it again" in line and not (out / "hubert_laser.pt").exists()


def test_ckpt_refused_by_the_restricted_unpickler_is_one_line(tmp_path, tiny_hubert_ckpt, demo_corpus):
    marker = tmp_path / "ran"
    weights = torch.load(tiny_hubert_ckpt, weights_only=True)["model_weight"]
    ckpt = tmp_path / "evil.pt"
    torch.save({"cfg": RunsCode(f"touch {marker}"), "model": weights, "task_state": {}}, ckpt)
    result = finetune_cli("--ckpt", str(ckpt), "--data", str(demo_corpus), "--out", str(tmp_path / "run"))
    line = error_line(result.stdout + result.stderr, result.returncode, ckpt, "refusing to load it")
    assert "posix.system" in line or "os.system" in line
    assert not marker.exists()


def test_out_naming_a_file_is_refused_before_any_model_loads(
    tmp_path, monkeypatch, caplog, tiny_hubert_ckpt, demo_corpus
):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("s3prl_laser.models.upstream.load_base_model", no_model)
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus)]
    code = main([*argv, "--out", str(out)])
    line = error_line(caplog.text, code, out, "is an existing file, not a folder")
    assert "--out" in line and out.read_text() == "keep me\n"
    code = main([*argv, "--out", str(out / "run")])  # a folder below a file cannot be made either
    assert error_line(caplog.text, code, out / "run", "is a file")


def test_unknown_device_names_the_flag(tmp_path, caplog, tiny_hubert_ckpt, demo_corpus):
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus)]
    code = main([*argv, "--out", str(tmp_path / "run"), "--device", "gpu"])
    assert error_line(caplog.text, code, "--device gpu", "not a torch device")


def test_resume_skips_a_damaged_newest_checkpoint_and_continues_exactly(
    tmp_path, caplog, tiny_hubert_ckpt, demo_corpus
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--data", str(demo_corpus)]
    assert main([*argv, "--out", str(straight), *FAST, "steps=6", "save_every=2"]) == 0
    # The run in `resumed` was killed after its step-6 checkpoint, which a disk fault then cut short.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")
    shutil.copy(checkpoints.checkpoint_path(straight, 4), checkpoints.checkpoint_path(resumed, 4))
    newest = checkpoints.checkpoint_path(resumed, 6)
    truncated_copy(checkpoints.checkpoint_path(straight, 6), newest)
    assert main(["--out", str(resumed), "--resume"]) == 0
    assert f"--resume: {newest} is damaged" in caplog.text and "Traceback" not in caplog.text
    assert (resumed / "checkpoints" / "step_0000006.pt.damaged").is_file()
    a = torch.load(straight / "hubert_laser.pt", weights_only=True)["model_weight"]
    b = torch.load(resumed / "hubert_laser.pt", weights_only=True)["model_weight"]
    assert all(torch.equal(a[name], b[name]) for name in a)  # resumed from step 4: the same run

    broken = tmp_path / "broken"
    shutil.copytree(resumed, broken, ignore=shutil.ignore_patterns("*.damaged", "hubert_laser.pt"))
    for step, path in checkpoints.list_checkpoints(broken):
        truncated_copy(checkpoints.checkpoint_path(straight, step), path)
    code = main(["--out", str(broken), "--resume"])
    line = error_line(caplog.text, code, "no readable checkpoint", broken / "checkpoints")
    assert "step_0000004.pt" in line and "step_0000006.pt" in line


def test_data_naming_an_audio_or_binary_file_is_one_line(tmp_path, caplog, tiny_hubert_ckpt, demo_corpus):
    clip = sorted(demo_corpus.rglob("*.flac"))[0]
    argv = ["--upstream", "hubert", "--ckpt", str(tiny_hubert_ckpt), "--out", str(tmp_path / "run")]
    code = main([*argv, "--data", str(clip)])
    assert error_line(caplog.text, code, f"--data {clip}", "is one audio file")
    code = main([*argv, "--data", str(tiny_hubert_ckpt)])
    assert error_line(caplog.text, code, f"--data {tiny_hubert_ckpt}", "not a text manifest")
    assert not (tmp_path / "run").exists()


def test_a_damaged_length_index_is_read_again(tmp_path, caplog, demo_corpus):
    from s3prl_laser.training.config import resolve_config
    from s3prl_laser.training.length_index import INDEX_NAME, load_or_build_index
    from s3prl_laser.training.ranks import DistEnv

    cfg = resolve_config("hubert", overrides=[f"data={demo_corpus}"])
    first = load_or_build_index(cfg, tmp_path, DistEnv())
    index = tmp_path / INDEX_NAME
    index.write_bytes(index.read_bytes()[:40] + bytes([0xFF, 0xFE]) * 8)  # header cut, then garbage
    assert load_or_build_index(cfg, tmp_path, DistEnv()) == first
    assert f"{index} is damaged" in caplog.text


# -------------------------------------------------------------------------------------------- export
def test_export_of_a_damaged_ckpt_or_onto_a_file_is_one_line(tmp_path, tiny_wavlm_ckpt, capsys):
    ckpt = truncated_copy(tiny_wavlm_ckpt, tmp_path / "wavlm_laser.pt")
    code = export_main(["--ckpt", str(ckpt), "--to", "hf", str(tmp_path / "hf")])
    assert "export: error:" in error_line(capsys.readouterr().err, code, ckpt, "is damaged")
    assert not (tmp_path / "hf").exists()
    target = tmp_path / "model.bin"
    target.write_bytes(b"x")
    code = export_main(["--ckpt", str(tiny_wavlm_ckpt), "--to", "hf", str(target)])
    assert error_line(capsys.readouterr().err, code, target, "is an existing file")
    code = export_main(["--ckpt", str(tmp_path / "nowhere.pt"), "--to", "hf", str(tmp_path / "hf")])
    assert error_line(capsys.readouterr().err, code, tmp_path / "nowhere.pt", "no such file")


# ------------------------------------------------------------------------------------- registration
def test_a_failing_registration_leaves_s3prl_hub_working(tmp_path):
    code = (
        "import sys; sys.modules['s3prl_laser.plugin.hubconf'] = None\n"  # our entries cannot be imported
        "import s3prl.hub\n"
        "print(hasattr(s3prl.hub, 'hubert_laser'), callable(s3prl.hub.hubert_local))\n"
    )
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
    ours = [line for line in result.stderr.splitlines() if "s3prl_laser" in line]
    assert len(ours) == 1 and "register_into(s3prl.hub) failed" in ours[0], result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------- recipes
def recipe_copy(tmp_path: Path) -> tuple[Path, dict]:
    """A checkout's downstream_recipes/ and an environment whose PATH has no Python at all."""
    repo = tmp_path / "checkout"
    shutil.copytree(RECIPES, repo / "downstream_recipes", ignore=shutil.ignore_patterns("__pycache__"))
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("dirname", "basename"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX")}
    return repo, {**env, "PATH": str(tools)}


def test_recipe_finds_the_venv_of_the_checkout_without_activation(tmp_path):
    repo, env = recipe_copy(tmp_path)
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the checkout's venv, not activated
    python.chmod(0o755)
    bash = shutil.which("bash")
    result = subprocess.run([bash, str(repo / "downstream_recipes" / "superb_asr.sh"), "--help"],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: superb_asr.sh" in result.stdout


def test_recipe_without_an_environment_says_how_to_point_at_one(tmp_path):
    repo, env = recipe_copy(tmp_path)
    bash = shutil.which("bash")
    result = subprocess.run([bash, str(repo / "downstream_recipes" / "superb_pr.sh"), "--help"],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no Python with s3prl-laser installed found" in result.stderr and "PYTHON=" in result.stderr
    wrong = {**env, "PYTHON": str(tmp_path / "bin" / "dirname")}  # not a Python: named in the message
    result = subprocess.run([bash, str(repo / "downstream_recipes" / "superb_pr.sh"), "--help"],
                            env=wrong, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and f"PYTHON={tmp_path / 'bin' / 'dirname'}" in result.stderr


@pytest.fixture
def superb(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    import superb

    return superb


def test_recipe_inputs_are_checked_before_data_preparation(tmp_path, superb, demo_corpus, tiny_hubert_ckpt,
                                                           capsys):  # fmt: skip
    out = tmp_path / "superb"
    ckpt = truncated_copy(tiny_hubert_ckpt, tmp_path / "hubert_laser.pt")
    base = ["--librispeech", str(demo_corpus), "--out", str(out), "--device", "cpu"]
    code = superb.main(["asr", "--upstream", "hubert_laser", "--ckpt", str(ckpt), *base])
    assert error_line(capsys.readouterr().err, code, ckpt, "is damaged")
    code = superb.main(["asr", "--upstream", "hubert_lasr", *base])
    assert error_line(capsys.readouterr().err, code, "--upstream hubert_lasr", "no such entry")
    code = superb.main(["pr", "--upstream", "hubert_laser", "--ckpt", str(tiny_hubert_ckpt), "--librispeech",
                        str(tmp_path / "LibriSpeech"), "--out", str(out)])  # fmt: skip
    assert error_line(capsys.readouterr().err, code, tmp_path / "LibriSpeech", "no such folder")
    assert not (out / "len_for_bucket").exists()


# ------------------------------------------------------------------------------- two processes, gloo
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_processes(tmp_path: Path, ckpt: Path, data: Path, where: str, what: str, call: int):
    """Run the fault-injected finetune as ranks 0 and 1 of a gloo group; returns ``[(code, output)] * 2``."""
    port, out = free_port(), tmp_path / "ddp"
    argv = [sys.executable, str(REPO / "tests" / "fault_injection.py"), where, what, str(call), "--"]
    argv += ["--upstream", "hubert", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out)]
    argv += ["--device", "cpu", *FAST, "steps=8", "save_every=100"]
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        processes.append(warm_processes.Popen(argv, env=env, **pipes))
    results = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("a process did not exit: the ranks hang instead of stopping together")
        results.append((process.returncode, output))
    return results, out


@pytest.mark.fault_injection
def test_a_bug_on_one_rank_keeps_its_traceback_and_stops_every_rank(tmp_path, tiny_hubert_ckpt, demo_corpus):
    results, out = two_processes(tmp_path, tiny_hubert_ckpt, demo_corpus, "loss", "error", 3)
    (code0, out0), (code1, out1) = results
    assert code1 == 1 and "Traceback" in out1 and "RuntimeError: injected fault in loss on rank 1" in out1
    assert code0 == 1 and "Traceback" not in out0, out0
    assert "other process(es) failed" in out0
    assert not (out / "hubert_laser.pt").exists()


@pytest.mark.fault_injection
def test_a_rank_that_dies_after_the_all_reduce_stops_the_others(tmp_path, tiny_hubert_ckpt, demo_corpus):
    started = time.monotonic()
    results, out = two_processes(tmp_path, tiny_hubert_ckpt, demo_corpus, "clip", "error", 2)
    (code0, out0), (code1, out1) = results
    assert code1 == 1 and "RuntimeError: injected fault in clip on rank 1" in out1
    assert code0 == 1 and "lost contact with another process" in out0 and "Traceback" not in out0, out0
    assert not (out / "hubert_laser.pt").exists() and time.monotonic() - started < 120


@pytest.mark.fault_injection
def test_a_stop_signal_on_one_rank_saves_and_exits_128_plus_signal_on_all(tmp_path, tiny_hubert_ckpt,
                                                                          demo_corpus):  # fmt: skip
    results, out = two_processes(tmp_path, tiny_hubert_ckpt, demo_corpus, "loss", "sigterm", 2)
    for code, output in results:
        assert code == 128 + signal.SIGTERM and "Traceback" not in output, output
    steps = [step for step, _ in checkpoints.list_checkpoints(out)]
    assert steps and steps[-1] < 8  # stopped early, after saving the step it was on
    assert not (out / "hubert_laser.pt").exists()  # an unfinished run exports nothing
    assert checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))["world_size"] == 2


def test_a_run_config_cut_inside_a_key_is_one_line_naming_it(tmp_path, tiny_hubert_ckpt, demo_corpus):
    """A copy of the run folder stopped half-way through ``config.yaml``, inside a key: the YAML parser's
    seven-line message was printed; one line names the file, where, and how to restore it."""
    from s3prl_laser.training.config import resolve_config, write_config

    out = tmp_path / "run"
    out.mkdir()
    cfg = resolve_config("hubert", extra={"ckpt": str(tiny_hubert_ckpt), "data": str(demo_corpus)})
    write_config(cfg, out / "config.yaml")
    text = (out / "config.yaml").read_text()
    cut = text.index("\ngrad_clip:") + len("\ngrad_cl")
    (out / "config.yaml").write_text(text[:cut])
    command = [sys.executable, "-m", "s3prl_laser.finetune", "--out", str(out), "--resume"]
    result = warm_processes.run(command, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    line = error_line(output, result.returncode, out / "config.yaml", "is damaged (cut short or edited")
    assert len(output.strip().splitlines()) == 1, output
    row = text[:cut].count("\n") + 1
    assert f"line {row}, column 8: YAML syntax error, could not find expected ':'" in line, line  # grad_cl|
    assert "restore it from a copy" in line and not (out / "run.lock").exists()
