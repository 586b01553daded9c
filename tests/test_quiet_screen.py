"""Every entry point's screen shows our progress and results, not other libraries' warnings or bars.

Each command runs as a user runs it (a subprocess of this environment's Python) on the tiny bundled demo;
its whole output (stdout and stderr) must hold no line that ``foreign_lines.FOREIGN`` matches, and
``S3PRL_LASER_LOG=debug`` must bring that chatter back (it is logged at DEBUG, not dropped). The SUPERB
ASR recipe's screen is checked by ``test_recipes.py::test_asr_recipe_end_to_end``.
"""

import json
import os
import sys

import pytest
from foreign_lines import FOREIGN, REPO, foreign_lines, screen_of

pytestmark = pytest.mark.espnet_lane

HUB_SNIPPET = """
import sys, torch, s3prl.hub
from s3prl.nn import S3PRLUpstream
expert = s3prl.hub.wavlm_laser(ckpt=sys.argv[1]).eval()
print(len(expert([torch.randn(16000)])["hidden_states"]), "hidden states")
upstream = S3PRLUpstream("wavlm_laser", path_or_url=sys.argv[1])
hidden, lengths = upstream(torch.randn(2, 16000), torch.tensor([16000, 12000]))
print(len(hidden), "layers")
"""


@pytest.mark.slow
def test_finetune_demo_shows_only_ours(wavlm_demo_run):
    out, screen = wavlm_demo_run
    assert foreign_lines(screen) == []
    assert "LASER demo:" in screen and "LASER: 100%" in screen
    assert "INFO s3prl_laser.finetune: tuned upstream written to" in screen
    # s3prl's model config, its loggers and torch's deprecation notices go to DEBUG
    for chatter in ("WavLM Config", "FutureWarning", "DeprecationWarning", "INFO s3prl."):
        assert chatter not in screen, chatter


@pytest.mark.slow  # shares the demo run (conftest.py)
def test_probe_shows_only_ours(wavlm_demo_run, demo_corpus, tmp_path):
    """The probe loads both upstreams through s3prl (WavLM's attention warns there) and trains two heads."""
    out, _ = wavlm_demo_run
    screen = screen_of("-m", "s3prl_laser.probe", "--data", str(demo_corpus), "--out", str(tmp_path),
                       "--upstream", f"wavlm_local:{out / 'tiny_wavlm.pt'}",
                       "--upstream", f"wavlm_laser:{out / 'wavlm_laser.pt'}",
                       "--train-hours", "0.005", "--dev-minutes", "0.1", "--steps", "3")  # fmt: skip
    assert foreign_lines(screen) == []
    assert "wavlm_laser:" in screen and "CER" in screen


@pytest.mark.slow  # shares the demo run (conftest.py)
def test_export_shows_only_ours(wavlm_demo_run, tmp_path):
    out, _ = wavlm_demo_run
    screen = screen_of("-m", "s3prl_laser.export", "--ckpt", str(out / "wavlm_laser.pt"), "--to", "hf",
                       str(tmp_path / "hf"), "--verify")  # fmt: skip
    assert foreign_lines(screen) == []
    assert "verified: all 5 hidden states" in screen


@pytest.mark.slow  # shares the demo run (conftest.py)
def test_hub_entries_in_a_users_program_show_only_its_output(wavlm_demo_run):
    out, _ = wavlm_demo_run
    screen = screen_of("-c", HUB_SNIPPET, str(out / "wavlm_laser.pt"))
    assert screen.splitlines() == ["5 hidden states", "5 layers"]


@pytest.mark.one_lane  # our log routing; each lane's screen is checked here and in the next test
def test_debug_brings_other_libraries_chatter_back(tmp_path):
    """s3prl's model code builds its positional convolution with torch's deprecated ``weight_norm``."""
    quiet = screen_of("-m", "s3prl_laser.fixtures", "--hubert", str(tmp_path / "h.pt"))
    loud = screen_of("-m", "s3prl_laser.fixtures", "--hubert", str(tmp_path / "h2.pt"), debug=True)
    warning = "`torch.nn.utils.weight_norm` is deprecated"
    assert warning not in quiet and foreign_lines(quiet) == []
    assert any(warning in line and line.startswith("DEBUG ") for line in loud.splitlines()), loud


def test_fixtures_manifest_and_compare_show_only_ours(demo_corpus, tmp_path):
    screens = [
        screen_of(
            "-m", "s3prl_laser.fixtures", "--hubert", str(tmp_path / "h.pt"), "--wavlm", str(tmp_path / "w")
        ),
        screen_of("-m", "s3prl_laser.manifest", str(demo_corpus), "-o", str(tmp_path / "m.tsv")),
    ]
    result = {"task": "ASR", "upstream": "hubert_laser", "metric": "WER", "value": 6.0}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "result.json").write_text(json.dumps(result))
    compare = screen_of("downstream_recipes/compare.py", str(tmp_path / "runs"), "--out", str(tmp_path / "c"))
    screens.append(compare)
    for screen in screens:
        assert foreign_lines(screen) == [], screen


def test_a_childs_chatter_goes_to_the_recipe_log_only(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "downstream_recipes"))
    monkeypatch.delenv("S3PRL_LASER_LOG", raising=False)
    try:
        import superb
    finally:
        sys.path.remove(str(REPO / "downstream_recipes"))
    child = "import warnings; warnings.warn('old API', FutureWarning); print('step 1: loss 2.0')"
    output = superb.run_logged([sys.executable, "-c", child], tmp_path, dict(os.environ), tmp_path / "log")
    shown = capsys.readouterr().out
    assert "step 1: loss 2.0" in shown and foreign_lines(shown) == []
    assert FOREIGN.search(output) and (tmp_path / "log").read_text() == output
