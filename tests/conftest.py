"""Shared pytest fixtures: tiny HuBERT/WavLM checkpoints built once per session, the bundled demo corpus.

Nothing heavy happens at import time: torch and s3prl are imported inside the fixtures. Tests marked
``triton_interpreter`` only run where ``TRITON_INTERPRET=1`` (see ``pytest_collection_modifyitems``).

- ``tiny_hubert_ckpt`` / ``tiny_wavlm_ckpt``: ``Path`` of a tiny random-init checkpoint (seed 0) in
  s3prl's own format (HuBERT converted / WavLM cfg+model), 4 layers, 64 dims, frame stride 320 samples.
  Loadable by ``s3prl.hub.hubert_local(ckpt=str(path))`` / ``wavlm_local`` and by
  ``torch.load(weights_only=True)``.
  Treat the files as read-only; build your own variant with ``s3prl_laser.fixtures.build_tiny_*``.
- ``demo_corpus``: ``Path`` of the bundled LibriSpeech-layout root (``.../LibriSpeech``) with
  ``train-clean-100``, ``dev-clean``, ``test-clean`` and ``phonemes/<split>.txt``.
- ``wavlm_demo_run``: ``(run folder, screen)`` of one WavLM demo (3 steps, 2 report clips) run as a user runs
  it, ``python -m s3prl_laser.finetune`` in a child process; the screen is its stdout + stderr. WavLM's
  attention raises torch's key_padding_mask warning at every step. Treat the folder as read-only.
"""

import importlib.util
import os
from pathlib import Path

import pytest

# The tests set what they depend on: the commands they start see which warnings other libraries raise (they
# check where those go), whatever filter the shell that runs the suite sets (PYTHONWARNINGS=ignore there
# would silence them in every child process).
os.environ.pop("PYTHONWARNINGS", None)


def pytest_collection_modifyitems(config, items):
    """Deselect ``triton_interpreter`` tests unless ``TRITON_INTERPRET=1``, ``espnet`` tests without ESPnet,
    ``one_lane`` and ``fault_injection`` tests on the classic lane.

    Triton reads that variable once, at import, so those tests run in the child pytest that
    ``tests/test_softdtw_triton.py::test_triton_interpreter_suite`` starts with it set. ``espnet`` tests
    run on the ESPnet lane (``make LANE=espnet test`` sets ``S3PRL_LASER_LANE=espnet``; there they always
    run). ``one_lane`` tests run once, where the current extra is installed (``make test``; CI runs them on
    the ESPnet lane, see ``.ci/run``), not again on the classic lane: they check the project's own files,
    which no lane package changes, and the Triton kernels' numerics under the interpreter (every lane
    compiles the kernels for sm_90 with its own Triton). ``fault_injection`` tests (a rank that dies, runs
    out of memory or cannot write its checkpoint, a second node, a signal sent twice) check our coordination
    code on top of torch.distributed. The classic lane does not run them again: its two torchrun tests (two
    CPU processes in step; SIGTERM twice on every rank) cover torchrun, gloo and signals on its torch.
    """
    lane = os.environ.get("S3PRL_LASER_LANE", "current")
    unwanted = set() if os.environ.get("TRITON_INTERPRET") == "1" else {"triton_interpreter"}
    if importlib.util.find_spec("espnet2") is None and lane != "espnet":
        unwanted.add("espnet")
    if lane == "classic":
        unwanted.update(("one_lane", "fault_injection"))
    selected = [item for item in items if not any(item.get_closest_marker(name) for name in unwanted)]
    if len(selected) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in selected])
        items[:] = selected


@pytest.fixture(scope="session")
def tiny_hubert_ckpt(tmp_path_factory) -> Path:
    from s3prl_laser.fixtures import build_tiny_hubert

    return build_tiny_hubert(tmp_path_factory.mktemp("tiny_hubert") / "tiny_hubert.pt", seed=0)


@pytest.fixture(scope="session")
def tiny_wavlm_ckpt(tmp_path_factory) -> Path:
    from s3prl_laser.fixtures import build_tiny_wavlm

    return build_tiny_wavlm(tmp_path_factory.mktemp("tiny_wavlm") / "tiny_wavlm.pt", seed=0)


@pytest.fixture(scope="session")
def tiny_wav2vec2_ckpt(tmp_path_factory) -> Path:
    from s3prl_laser.fixtures import build_tiny

    return build_tiny("wav2vec2", tmp_path_factory.mktemp("tiny_wav2vec2") / "tiny_wav2vec2.pt", seed=0)


@pytest.fixture(scope="session")
def tiny_data2vec_ckpt(tmp_path_factory) -> Path:
    from s3prl_laser.fixtures import build_tiny

    return build_tiny("data2vec", tmp_path_factory.mktemp("tiny_data2vec") / "tiny_data2vec.pt", seed=0)


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    from s3prl_laser.fixtures import demo_corpus_root

    return demo_corpus_root()


@pytest.fixture(scope="session")
def wavlm_demo_run(tmp_path_factory) -> tuple[Path, str]:
    from foreign_lines import screen_of

    out = tmp_path_factory.mktemp("wavlm_demo") / "demo"
    screen = screen_of("-m", "s3prl_laser.finetune", "--upstream", "wavlm", "--demo", "--out", str(out),
                       "steps=3", "report_clips=2")  # fmt: skip
    return out, screen


def pytest_sessionfinish(session, exitstatus):
    """Stop the warm interpreters that ``warm_processes`` started for this session's command-line runs."""
    import warm_processes

    warm_processes.close_servers()
