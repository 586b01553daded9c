"""Second-view perturbation: lengths, pitch, reproducibility, batching, and agreement with torchaudio."""

import math
from fractions import Fraction

import pytest
import torch
import torchaudio

from s3prl_laser.objective.perturb import (
    PRESETS,
    LaserPerturbation,
    PerturbParams,
    SincResampler,
    phase_vocoder,
)

SR = 16000


def sine(freq, seconds=1.0, sample_rate=SR, amplitude=0.5, dtype=torch.float32):
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).to(dtype)


def dominant_frequency(wav, sample_rate=SR):
    """Peak of the Hann-windowed magnitude spectrum, zero-padded to a 0.25 Hz grid, in Hz."""
    n = 4 * sample_rate
    spectrum = torch.fft.rfft(wav.double() * torch.hann_window(wav.shape[0], dtype=torch.float64), n=n).abs()
    return float(spectrum.argmax()) * sample_rate / n


def test_presets_are_the_papers():
    assert LaserPerturbation.from_preset("hubert").speed_factors == (0.9, 1.0, 1.1)
    assert LaserPerturbation.from_preset("wavlm").speed_factors == (0.8, 0.85, 0.9, 1.0, 1.1, 1.15, 1.2)
    assert LaserPerturbation.from_preset("hubert").pitch_semitones == 2
    with pytest.raises(ValueError, match="hubert.*wavlm"):
        LaserPerturbation.from_preset("contentvec")


@pytest.fixture(scope="module")
def wavlm_perturb():
    """One instance for the module, so its resampling tables are built once."""
    return LaserPerturbation.from_preset("wavlm")


@pytest.mark.parametrize("factor", PRESETS["wavlm"])
@pytest.mark.parametrize("length", [8000, 3001, 777])
def test_output_length_is_ceil_of_length_over_factor(wavlm_perturb, factor, length):
    perturb = wavlm_perturb
    wav = 0.1 * torch.randn(length, generator=torch.Generator().manual_seed(length))
    expected = math.ceil(Fraction(length) / Fraction(str(factor)))
    assert perturb.speed_length(length, factor) == expected
    for semitones in (2.0, -2.0, 0.0):
        assert perturb.apply(wav, factor, semitones).shape == (expected,)


def test_drawn_parameters_cover_the_preset_and_both_signs():
    perturb = LaserPerturbation.from_preset("wavlm")
    g = torch.Generator().manual_seed(0)
    draws = [perturb.sample_params(g) for _ in range(700)]
    assert {d.factor for d in draws} == set(PRESETS["wavlm"])
    ups = sum(d.semitones == 2 for d in draws)
    assert sum(d.semitones == -2 for d in draws) + ups == len(draws)
    assert 0.4 < ups / len(draws) < 0.6


def test_same_seed_same_output_and_call_equals_sample_then_apply():
    perturb = LaserPerturbation.from_preset("wavlm")
    wav = 0.1 * torch.randn(8000, generator=torch.Generator().manual_seed(1))
    first = [perturb(wav, torch.Generator().manual_seed(seed)) for seed in range(6)]
    again = [perturb(wav, torch.Generator().manual_seed(seed)) for seed in range(6)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert len({tuple(x.shape) for x in first}) > 1 or any(not torch.equal(first[0], x) for x in first[1:])
    params = perturb.sample_params(torch.Generator().manual_seed(3))
    torch.testing.assert_close(perturb.apply(wav, params.factor, params.semitones), first[3])


@pytest.mark.parametrize("semitones", [2.0, -2.0])
def test_pitch_moves_by_two_to_the_semitones_over_twelve(semitones):
    perturb = LaserPerturbation([1.0])
    out = perturb.apply(sine(440.0), 1.0, semitones)
    expected = 440.0 * 2 ** (semitones / 12)
    assert dominant_frequency(out) == pytest.approx(expected, rel=0.01)
    assert abs(dominant_frequency(out) - 440.0) > 20


@pytest.mark.parametrize("factor,semitones", [(1.1, 0.0), (0.9, 0.0), (0.8, 2.0), (1.15, -2.0)])
def test_speed_multiplies_pitch_by_the_factor(factor, semitones):
    perturb = LaserPerturbation([factor], pitch_semitones=abs(semitones))
    out = perturb.apply(sine(300.0), factor, semitones)
    assert dominant_frequency(out) == pytest.approx(300.0 * factor * 2 ** (semitones / 12), rel=0.01)


def test_output_is_finite_and_in_range():
    perturb = LaserPerturbation.from_preset("wavlm")
    g = torch.Generator().manual_seed(2)
    clips = [
        sine(220.0),
        sine(3000.0, amplitude=0.9),
        0.3 * torch.randn(9000, generator=g),
        torch.zeros(4000),
    ]
    for clip in clips:
        for params in (PerturbParams(0.8, 2.0), PerturbParams(1.2, -2.0)):
            out = perturb.apply(clip, params.factor, params.semitones)
            assert torch.isfinite(out).all()
            assert out.abs().max() <= 1.2 * clip.abs().max()
    assert perturb.apply(torch.zeros(4000), 1.1, 2.0).abs().max() == 0


def test_batch_equals_one_clip_at_a_time():
    perturb = LaserPerturbation.from_preset("wavlm")
    g = torch.Generator().manual_seed(4)
    clips = [0.2 * torch.randn(n, generator=g) for n in (16000, 9000, 12345, 600, 20000, 16000, 3001)]
    batch = perturb.batch(clips, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    single = [perturb(clip, g) for clip in clips]
    for b, s in zip(batch, single, strict=True):
        assert b.shape == s.shape
        torch.testing.assert_close(b, s, rtol=1e-4, atol=1e-5)


def test_a_shorter_clip_in_a_batch_keeps_its_last_frame():
    """Frames past a shorter clip's end must be +0: a -0.0 real part has angle pi, which changed the
    phase-vocoder's last frame of that clip (here: by 5e-3 at the clip's tail)."""
    perturb = LaserPerturbation([1.0], pitch_semitones=2)
    g = torch.Generator().manual_seed(0)
    clips = [0.1 * torch.randn(14546, generator=g), 0.1 * torch.randn(13637, generator=g)]
    params = [PerturbParams(1.0, 2.0)] * 2
    for clip, batched in zip(clips, perturb.apply_batch(clips, params), strict=True):
        torch.testing.assert_close(batched, perturb.apply(clip, 1.0, 2.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rate", [2 ** (-2 / 12), 2 ** (2 / 12), 1.5])
@pytest.mark.parametrize("shape", [(257, 1), (257, 60), (3, 257, 37)])
def test_phase_vocoder_matches_torchaudio(rate, shape):
    spec = torch.randn(*shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(len(shape)))
    phase_advance = torch.linspace(0, math.pi * 128, 257, dtype=torch.float64)[:, None]
    ours = phase_vocoder(spec, rate, phase_advance)
    torch.testing.assert_close(ours, torchaudio.functional.phase_vocoder(spec, rate, phase_advance))


@pytest.mark.parametrize("orig,new", [(9, 10), (23, 20), (480, 441), (441, 480)])
def test_resampler_matches_torchaudio(orig, new):
    wav = torch.randn(3000, dtype=torch.float64, generator=torch.Generator().manual_seed(orig))
    ours = SincResampler(orig, new, wav.device, wav.dtype)(wav[None], [3000])[0]
    torch.testing.assert_close(ours, torchaudio.functional.resample(wav, orig, new), rtol=1e-9, atol=1e-9)


def test_matches_torchaudio_speed_then_pitch_shift():
    """At 1 kHz torchaudio's kernels are small, so every factor and sign is compared in float64."""
    perturb = LaserPerturbation([0.9, 1.0, 1.1], sample_rate=1000)
    wav = 0.3 * torch.randn(3000, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for factor in perturb.speed_factors:
        for semitones in (2, -2):
            sped = torchaudio.functional.speed(wav, 1000, factor)[0]
            reference = torchaudio.functional.pitch_shift(sped, 1000, semitones)
            ours = perturb.apply(wav, factor, float(semitones))
            assert ours.dtype == torch.float64 and ours.shape == reference.shape
            # torchaudio builds its STFT window in float32 even for float64 audio: ~1e-6 apart
            assert float((ours - reference).norm() / reference.norm()) < 3e-5


def test_matches_torchaudio_pitch_shift_at_16khz():
    perturb = LaserPerturbation([1.0])
    wav = 0.3 * torch.randn(4000, generator=torch.Generator().manual_seed(7))
    reference = torchaudio.functional.pitch_shift(wav, SR, -2)
    ours = perturb.apply(wav, 1.0, -2.0)
    assert float((ours - reference).norm() / reference.norm()) < 1e-3  # torchaudio's float32 kernel


def test_rejects_bad_input():
    perturb = LaserPerturbation.from_preset("hubert")
    with pytest.raises(ValueError, match="1-D"):
        perturb(torch.randn(2, 16000))
    with pytest.raises(ValueError, match="samples"):
        perturb(torch.zeros(0))
    with pytest.raises(ValueError, match="float32 or float64"):
        perturb(torch.zeros(16000, dtype=torch.int16))
    with pytest.raises(ValueError, match="float32 or float64"):
        perturb(torch.zeros(16000, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one device and dtype"):
        perturb.batch([torch.randn(1000), torch.randn(1000, dtype=torch.float64)])
    with pytest.raises(ValueError, match="positive"):
        LaserPerturbation([0.9, 0.0])
    with pytest.raises(ValueError, match="positive"):
        LaserPerturbation([-1.1])
    with pytest.raises(ValueError, match="positive"):
        LaserPerturbation([])
    with pytest.raises(ValueError, match="positive"):
        perturb.apply(torch.randn(16000), -0.9, 2.0)
    with pytest.raises(ValueError, match="pitch_semitones"):
        LaserPerturbation([1.0], pitch_semitones=-2)
    with pytest.raises(ValueError, match="parameter draws"):
        perturb.apply_batch([torch.randn(1000)], [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_on_cuda_matches_cpu():
    perturb = LaserPerturbation.from_preset("wavlm")
    g = torch.Generator().manual_seed(8)
    clips = [0.2 * torch.randn(n, generator=g) for n in (16000, 9000, 12345)]
    params = [PerturbParams(0.85, 2.0), PerturbParams(1.15, -2.0), PerturbParams(1.0, 2.0)]
    on_cpu = perturb.apply_batch(clips, params)
    on_gpu = perturb.apply_batch([c.cuda() for c in clips], params)
    for c, d in zip(on_cpu, on_gpu, strict=True):
        assert d.device.type == "cuda"
        torch.testing.assert_close(d.cpu(), c, rtol=1e-4, atol=1e-5)
