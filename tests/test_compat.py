"""Stand-ins for names s3prl imports from libraries that moved on (s3prl_laser.plugin.shims), on either lane.

References: huggingface_hub's own token reader, the standard library's ``wave`` decoder, and the lane's real
modules (a name that exists must stay the library's own object).
"""

import subprocess
import sys
import types
import wave

import numpy as np
import pytest
import torch

from s3prl_laser.plugin import shims

CURRENT_HUB = shims._release(__import__("huggingface_hub").__version__) >= (1, 0)


def run_fresh(code: str, tmp_path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_runner_imports_resolve_in_a_fresh_interpreter(tmp_path):
    """The import lines of s3prl's run_downstream.py and downstream/runner.py, in a new interpreter."""
    code = """
import huggingface_hub, torchaudio
from huggingface_hub import HfApi, HfFolder, Repository
import s3prl.downstream.runner
from s3prl_laser.plugin import shims
print(HfFolder is shims.HfFolder, Repository is shims.Repository)
print(torchaudio.load is shims.load_with_soundfile)
"""
    hub_patched, repo_patched, load_patched = run_fresh(code, tmp_path).split()
    assert hub_patched == repo_patched == str(CURRENT_HUB)  # stand-ins only where hub >= 1 removed them
    import torchaudio

    torchaudio_needs_it = shims._release(torchaudio.__version__) >= shims.TORCHCODEC_ONLY_TORCHAUDIO
    assert load_patched == str(torchaudio_needs_it and shims._torchcodec_unusable() is not None)


def test_existing_names_are_never_shadowed():
    own_folder, own_repository = object(), object()
    hub = types.ModuleType("huggingface_hub")
    hub.__version__ = "0.36.2"
    hub.HfFolder, hub.Repository = own_folder, own_repository
    assert shims.patch_huggingface_hub(hub) == []
    assert (hub.HfFolder, hub.Repository) == (own_folder, own_repository)

    bare = types.ModuleType("huggingface_hub")
    bare.__version__ = "1.0.0"
    assert shims.patch_huggingface_hub(bare) == ["HfFolder", "Repository"]
    assert (bare.HfFolder, bare.Repository) == (shims.HfFolder, shims.Repository)

    old_torchaudio = types.ModuleType("torchaudio")
    old_torchaudio.__version__, old_torchaudio.load = "2.8.0+cu128", own_folder
    assert shims.patch_torchaudio(old_torchaudio) is False and old_torchaudio.load is own_folder


def test_what_s3prl_0418_imports_from_torchaudio_resolves_in_a_fresh_interpreter(tmp_path):
    """``set_audio_backend`` and ``torchaudio.sox_effects`` (s3prl 0.4.18's ``import s3prl.hub``): the
    library's own where it has them (torchaudio < 2.9), else the stand-ins, whose SoX functions refuse."""
    code = """
import torchaudio
torchaudio.set_audio_backend("sox_io")
from torchaudio.sox_effects import apply_effects_tensor
from s3prl_laser.plugin import shims
print(torchaudio.set_audio_backend is shims.set_audio_backend, apply_effects_tensor.__module__)
if apply_effects_tensor.__module__ == shims.__name__:  # the stand-in (the real one may need libsox)
    try:
        apply_effects_tensor(None, 16000, [["rate", "8000"]])
    except RuntimeError as error:
        print("refused:", error)
"""
    first, *rest = run_fresh(code, tmp_path).splitlines()
    import torchaudio

    removed = shims._release(torchaudio.__version__) >= (2, 9)  # set_audio_backend, sox_effects: gone
    stand_in, module = first.split()
    assert stand_in == str(removed)
    assert (module == shims.__name__) is removed
    if removed:
        assert rest and rest[0].startswith("refused: torchaudio >= 2.9 has no sox_effects"), rest


def test_torchaudio_stand_ins_never_shadow_the_librarys_own():
    own = object()
    module = types.ModuleType("torchaudio")
    module.__version__, module.set_audio_backend, module.load = "2.8.0+cu128", own, own
    shims.patch_torchaudio(module)
    assert module.set_audio_backend is own and module.load is own
    bare = types.ModuleType("torchaudio")
    bare.__version__ = "2.11.0"
    shims.patch_torchaudio(bare)
    assert bare.set_audio_backend is shims.set_audio_backend
    assert shims.set_audio_backend("sox_io") is None


def test_hf_folder_token_round_trip_through_huggingface_hubs_reader(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    shims.HfFolder.save_token("hf_laser_test")
    assert (tmp_path / "hf" / "token").read_text() == "hf_laser_test"
    assert huggingface_hub.get_token() == shims.HfFolder.get_token() == "hf_laser_test"
    shims.HfFolder.delete_token()
    assert huggingface_hub.get_token() is None and not (tmp_path / "hf" / "token").exists()


def test_repository_refuses_with_what_to_do_instead(tmp_path):
    with pytest.raises(RuntimeError, match=r"hf_hub/repo cannot be cloned.*upload_folder"):
        shims.Repository(local_dir=str(tmp_path / "hf_hub" / "repo"), clone_from="user/repo")


def write_pcm16(path, channels: np.ndarray, rate: int) -> None:
    """``channels``: int16 [C, T], written interleaved with the standard library's ``wave``."""
    with wave.open(str(path), "wb") as file:
        file.setnchannels(channels.shape[0])
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(channels.T.astype("<i2").tobytes())


@pytest.mark.parametrize("num_channels", [1, 2])
def test_soundfile_load_matches_the_pcm_samples(tmp_path, num_channels):
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32767, size=(num_channels, 1601), dtype=np.int16)
    write_pcm16(tmp_path / "clip.wav", pcm, 8000)
    expected = torch.from_numpy(pcm.astype(np.float32) / 32768.0)  # [C, T]

    waveform, rate = shims.load_with_soundfile(str(tmp_path / "clip.wav"))
    assert rate == 8000 and waveform.dtype == torch.float32
    torch.testing.assert_close(waveform, expected, rtol=0, atol=0)

    part, _ = shims.load_with_soundfile(tmp_path / "clip.wav", frame_offset=100, num_frames=37)
    torch.testing.assert_close(part, expected[:, 100:137], rtol=0, atol=0)
    time_first, _ = shims.load_with_soundfile(tmp_path / "clip.wav", channels_first=False)
    torch.testing.assert_close(time_first, expected.T, rtol=0, atol=0)
    with open(tmp_path / "clip.wav", "rb") as file:  # a binary file object, as torchaudio accepts
        from_file, _ = shims.load_with_soundfile(file)
    torch.testing.assert_close(from_file, expected, rtol=0, atol=0)


def test_torchaudio_load_reads_the_demo_corpus(demo_corpus):
    """Whatever ``torchaudio.load`` is on this lane (torchaudio's own or the stand-in), it decodes FLAC."""
    import soundfile
    import torchaudio

    flac = sorted((demo_corpus / "test-clean").rglob("*.flac"))[0]
    waveform, rate = torchaudio.load(str(flac))
    info = soundfile.info(str(flac))
    assert (tuple(waveform.shape), rate) == ((info.channels, info.frames), info.samplerate)
    assert waveform.dtype == torch.float32 and 0 < waveform.abs().max() <= 1


def test_a_failing_patch_is_logged_not_raised_into_the_import(monkeypatch, caplog):
    from s3prl_laser import _startup

    def broken(module):
        raise KeyError("boom")

    monkeypatch.setattr(shims, "patch_torchaudio", broken)
    module = types.ModuleType("torchaudio")
    with caplog.at_level("WARNING", logger="s3prl_laser._startup"):
        _startup.after_import(module)
    assert "s3prl_laser.plugin.shims.patch_torchaudio(torchaudio) failed: KeyError('boom')" in caplog.text


def test_torchaudio_release_comes_from_its_metadata_when_the_module_has_no_version():
    from importlib import metadata

    module = types.ModuleType("torchaudio")  # what torchaudio is when its version.py failed to import
    newer = shims._release(metadata.version("torchaudio")) >= shims.TORCHCODEC_ONLY_TORCHAUDIO
    assert shims.patch_torchaudio(module) is (newer and shims._torchcodec_unusable() is not None)
