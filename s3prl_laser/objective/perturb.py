"""The perturbed second view of LASER: speed perturbation, then a pitch shift of +-2 semitones.

As in the paper (see ``docs/method.md``, "The second view"), a view is made from a 1-D waveform by

1. **speed**: a factor ``f`` drawn uniformly from ``speed_factors``; the waveform is resampled from
   ``round(f * sample_rate)`` Hz to ``sample_rate`` Hz (torchaudio's ``functional.speed``), so an input of
   ``L`` samples gives exactly ``ceil(L * sample_rate / round(f * sample_rate))`` samples, i.e.
   ``ceil(L / f)`` for every preset factor (:meth:`LaserPerturbation.speed_length`);
2. **pitch**: ``+pitch_semitones`` or ``-pitch_semitones`` with probability 1/2 each, done as torchaudio's
   ``functional.pitch_shift`` does it: STFT (``n_fft=512``, hop 128, Hann window), phase-vocoder time stretch
   by ``2**(s/12)``, inverse STFT, then a sinc resampling from ``int(sample_rate * 2**(s/12))`` Hz back to
   ``sample_rate`` Hz, cut or zero-padded to the length it had before the shift.

The maths is torchaudio's (same kernels, same windows, same phase-vocoder formulas; tests compare each
piece and the whole with torchaudio); what differs is the cost:
torchaudio resamples with a dense ``[new, orig + 2 * width]`` polyphase kernel (16000 x 17973 for +2
semitones: 1.2 GB and 8 s to build, and ~0.4 s per 15-second clip to apply), this module applies the same
windowed-sinc taps sparsely (``2 * width + 2`` taps per output sample, tables cached per rate pair, device
and dtype), and processes a whole batch of clips at once, on whatever device the clips live on
(:meth:`LaserPerturbation.batch`). ``benchmarks/perturb.py`` measures both.

Example::

    >>> perturb = LaserPerturbation.from_preset("hubert")
    >>> g = torch.Generator().manual_seed(0)
    >>> view = perturb(torch.randn(16000), generator=g)  # one call: draw factor and semitones, apply
    >>> params = perturb.sample_params(g)  # or draw, log, then apply
    >>> view = perturb.apply(torch.randn(16000), params.factor, params.semitones)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Largest gcd-reduced source rate resampled with a dense polyphase conv1d rather than sparse taps
DENSE_MAX_ORIG = 64
PRESETS = {
    "hubert": (0.9, 1.0, 1.1),
    "wavlm": (0.8, 0.85, 0.9, 1.0, 1.1, 1.15, 1.2),
}


@dataclass(frozen=True)
class PerturbParams:
    """One draw of the perturbation: speed ``factor`` (> 1 is faster/shorter) and pitch ``semitones``."""

    factor: float
    semitones: float


def phase_vocoder(spec: torch.Tensor, rate: float, phase_advance: torch.Tensor) -> torch.Tensor:
    """``torchaudio.functional.phase_vocoder``, same maths, with angles and magnitudes taken once per frame.

    torchaudio gathers the two neighbouring input frames of every output frame and then takes their angle
    and magnitude (about ``2 / rate`` times per input frame); here they are taken once and gathered.
    ``spec: [..., freq, frames]`` complex and ``phase_advance: [freq, 1]`` give
    ``[..., freq, ceil(frames / rate)]``.

    Example::

        >>> spec = torch.stft(torch.randn(4000), 512, 128, window=torch.hann_window(512), return_complex=True)
        >>> phase_vocoder(spec, 0.9, torch.linspace(0, math.pi * 128, 257)[:, None]).shape
        torch.Size([257, 36])
    """
    if rate == 1.0:
        return spec
    real_dtype = spec.real.dtype
    steps = torch.arange(0, spec.shape[-1], rate, device=spec.device, dtype=real_dtype)
    alphas = steps % 1.0
    before = steps.long()
    angle = F.pad(spec.angle(), [0, 2])  # the two zero frames torchaudio appends have angle 0, norm 0
    norm = F.pad(spec.abs(), [0, 2])
    angle_0, angle_1 = angle[..., before], angle[..., before + 1]
    phase = angle_1 - angle_0 - phase_advance
    phase = phase - 2 * math.pi * torch.round(phase / (2 * math.pi))
    phase = torch.cat([angle[..., :1], (phase + phase_advance)[..., :-1]], dim=-1)
    mag = alphas * norm[..., before + 1] + (1 - alphas) * norm[..., before]
    return torch.polar(mag, torch.cumsum(phase, -1))


class SincResampler:
    """torchaudio's ``sinc_interp_hann`` resampling (lowpass width 6, rolloff 0.99), applied sparsely.

    Output sample ``j`` sits at input position ``j * orig / new`` and is a weighted sum of the input samples
    around it: the weights are torchaudio's windowed-sinc kernel evaluated at those samples only (a
    ``[new, 2 * width + 2]`` table, built once), so the cost is ``O(length * width)`` instead of
    torchaudio's ``O(length * orig)``. ``orig`` and ``new`` are reduced by their gcd. When the reduced
    ``orig`` is small (speed factors: 9 -> 10 for 0.9), the table is laid out as torchaudio's dense
    polyphase kernel and applied with one strided ``conv1d``, which is faster there.

    ``__call__(wavs: [B, T], lengths: list[int]) -> list[Tensor]``: clip ``b`` holds ``lengths[b]`` valid
    samples (the rest is ignored) and comes back with ``ceil(lengths[b] * new / orig)`` samples.

    Example::

        >>> SincResampler(14254, 16000, torch.device("cpu"), torch.float32)(torch.randn(1, 1000), [1000])
    """

    def __init__(
        self,
        orig: int,
        new: int,
        device: torch.device,
        dtype: torch.dtype,
        lowpass_filter_width: int = 6,
        rolloff: float = 0.99,
    ) -> None:
        gcd = math.gcd(orig, new)
        self.orig, self.new = orig // gcd, new // gcd
        base = min(self.orig, self.new) * rolloff
        self.width = math.ceil(lowpass_filter_width * self.orig / base)
        phase = torch.arange(self.new, dtype=torch.float64)
        # first[i]: the input sample at or just before output phase i, relative to its block of `orig` inputs
        self.first = (torch.arange(self.new) * self.orig) // self.new
        self.offsets = torch.arange(-self.width, self.width + 2)
        taps = (self.first[:, None] + self.offsets[None, :]).double()
        t = ((taps / self.orig - phase[:, None] / self.new) * base).clamp(
            -lowpass_filter_width, lowpass_filter_width
        )
        window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
        t = t * math.pi
        sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1.0, t))
        self.kernel = (sinc * window * base / self.orig).to(device=device, dtype=dtype)
        self.first, self.offsets = self.first.to(device), self.offsets.to(device)
        self.dense = None
        # dense[i, 0, first[i] + o + width] = tap o of phase i (torchaudio's [new, 1, orig + 2w + 1] layout)
        if self.orig <= DENSE_MAX_ORIG:
            self.dense = self.kernel.new_zeros(self.new, self.orig + 2 * self.width + 1)
            self.dense.scatter_(1, self.first[:, None] + self.offsets[None, :] + self.width, self.kernel)
            self.dense = self.dense[:, None, :]

    def output_length(self, length: int) -> int:
        return -(-length * self.new // self.orig)

    def __call__(self, wavs: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
        out_lengths = [self.output_length(n) for n in lengths]
        blocks = -(-max(out_lengths) // self.new)
        if min(lengths) < wavs.shape[1]:  # zero what lies past each clip: it is not signal
            positions = torch.arange(wavs.shape[1], device=wavs.device)
            valid = positions[None, :] < torch.tensor(list(lengths), device=wavs.device)[:, None]
            wavs = torch.where(valid, wavs, 0.0)
        if self.dense is not None:
            right = (blocks - 1) * self.orig + self.dense.shape[-1] - self.width - wavs.shape[1]
            padded = F.pad(wavs, (self.width, right))[:, None, :]
            resampled = F.conv1d(padded, self.dense, stride=self.orig).transpose(1, 2).flatten(1)
            return [resampled[b, :n] for b, n in enumerate(out_lengths)]
        # start[k, i]: padded-input index of the first tap of output k * new + i
        start = (torch.arange(blocks, device=wavs.device) * self.orig)[:, None] + self.first[None, :]
        taps = self.offsets.numel()
        last_start = (blocks - 1) * self.orig + (self.new - 1) * self.orig // self.new  # start.max(), no sync
        right = last_start + taps - self.width - wavs.shape[1]
        windows = F.pad(wavs, (self.width, right)).unfold(1, taps, 1)  # [B, L, taps]
        resampled = torch.einsum("bkit,it->bki", windows[:, start], self.kernel).flatten(1)
        return [resampled[b, :n] for b, n in enumerate(out_lengths)]


class LaserPerturbation:
    """Speed perturbation then a +-``pitch_semitones`` pitch shift of 1-D waveforms (see the module doc).

    Args:
        speed_factors: the factors to draw from, uniformly (> 1 speeds up and shortens the clip).
        pitch_semitones: the size of the pitch shift; its sign is drawn 50/50 (0 switches pitch shifting off).
        sample_rate: sample rate of the waveforms, in Hz.
        n_fft: STFT size of the phase vocoder (torchaudio's default 512; hop ``n_fft // 4``, Hann window).

    Calls: ``perturb(wav [T], generator=None) -> [T']``; ``perturb.batch(wavs: list of [T_b], generator)
    -> list of [T_b']``, on the device of the clips; ``sample_params(generator) -> PerturbParams`` with
    ``apply(wav, factor, semitones)`` / ``apply_batch(wavs, params)`` to log the draws. ``batch`` draws the
    parameters clip by clip in order, so it gives the same result as calling ``perturb`` on each clip with
    the same generator. Resampling tables and STFT windows are cached per (rates, device, dtype).

    Example::

        >>> perturb = LaserPerturbation([0.9, 1.0, 1.1], pitch_semitones=2)
        >>> views = perturb.batch([torch.randn(16000), torch.randn(12000)], torch.Generator().manual_seed(0))
    """

    def __init__(
        self,
        speed_factors: Sequence[float],
        pitch_semitones: float = 2,
        sample_rate: int = 16000,
        n_fft: int = 512,
    ) -> None:
        factors = tuple(float(f) for f in speed_factors)
        if not factors or any(not math.isfinite(f) or f <= 0 for f in factors):
            raise ValueError(f"speed_factors must be a non-empty list of positive numbers, got {factors}")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate}")
        if any(round(f * sample_rate) < 1 for f in factors):
            raise ValueError(f"speed_factors {list(factors)} are too small for sample_rate {sample_rate}")
        if not math.isfinite(pitch_semitones) or pitch_semitones < 0:
            raise ValueError(f"pitch_semitones must be >= 0 (its sign is drawn), got {pitch_semitones}")
        if n_fft < 4 or n_fft % 4:
            raise ValueError(f"n_fft must be a positive multiple of 4 (hop = n_fft // 4), got {n_fft}")
        self.speed_factors, self.pitch_semitones = factors, float(pitch_semitones)
        self.sample_rate, self.n_fft, self.hop = int(sample_rate), int(n_fft), int(n_fft) // 4
        self._cache: dict[tuple, object] = {}

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> LaserPerturbation:
        """The paper's speed factors for ``"hubert"`` or ``"wavlm"`` (pitch +-2 semitones for both)."""
        if name not in PRESETS:
            raise ValueError(f"unknown perturbation preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(PRESETS[name], **kwargs)

    def __repr__(self) -> str:
        return (
            f"LaserPerturbation(speed_factors={list(self.speed_factors)}, "
            f"pitch_semitones={self.pitch_semitones}, sample_rate={self.sample_rate}, n_fft={self.n_fft})"
        )

    def speed_rates(self, factor: float) -> tuple[int, int]:
        """``(orig, new)`` rates of the speed resampling, reduced by their gcd (equal when factor is 1)."""
        if not math.isfinite(factor) or round(factor * self.sample_rate) < 1:
            raise ValueError(f"speed factor must be a positive number, got {factor}")
        orig = round(factor * self.sample_rate)
        gcd = math.gcd(orig, self.sample_rate)
        return orig // gcd, self.sample_rate // gcd

    def speed_length(self, length: int, factor: float) -> int:
        """Samples after speed perturbation: ``ceil(length * new / orig)`` = ``ceil(length / factor)``."""
        orig, new = self.speed_rates(factor)
        return -(-length * new // orig)

    def sample_params(self, generator: torch.Generator | None = None) -> PerturbParams:
        """Draw a speed factor (uniform over ``speed_factors``) and a pitch shift (+ or -, 50/50)."""
        index = int(torch.randint(len(self.speed_factors), (), generator=generator))
        sign = 1.0 if int(torch.randint(2, (), generator=generator)) else -1.0
        return PerturbParams(self.speed_factors[index], sign * self.pitch_semitones)

    def __call__(self, wav: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw the parameters with ``generator`` (None: torch's global RNG), then perturb ``wav [T]``."""
        params = self.sample_params(generator)
        return self.apply(wav, params.factor, params.semitones)

    def batch(
        self, wavs: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Perturb each clip of ``wavs`` (1-D tensors on one device) with its own draw, in one batch."""
        return self.apply_batch(wavs, [self.sample_params(generator) for _ in wavs])

    def apply(self, wav: torch.Tensor, factor: float, semitones: float) -> torch.Tensor:
        """Speed-perturb ``wav [T]`` by ``factor``, then shift its pitch by ``semitones``."""
        return self.apply_batch([wav], [PerturbParams(factor, semitones)])[0]

    @torch.no_grad()
    def apply_batch(
        self, wavs: Sequence[torch.Tensor], params: Sequence[PerturbParams]
    ) -> list[torch.Tensor]:
        """Perturb each clip ``wavs[b] [T_b]`` with ``params[b]``, batched by equal parameters."""
        if len(wavs) != len(params):
            raise ValueError(f"got {len(wavs)} waveforms but {len(params)} parameter draws")
        if not wavs:
            return []
        for b, wav in enumerate(wavs):
            self._check_wav(wav, b)
        device, dtype = wavs[0].device, wavs[0].dtype
        if any(w.device != device or w.dtype != dtype for w in wavs):
            raise ValueError("all waveforms of a batch must share one device and dtype")
        out = list(wavs)
        for factor in sorted({p.factor for p in params}):
            orig, new = self.speed_rates(factor)
            if orig != new:
                members = [b for b, p in enumerate(params) if p.factor == factor]
                self._resample_into(out, members, orig, new)
        for b, wav in enumerate(out):
            if wav.shape[0] <= self.n_fft // 2:
                raise ValueError(
                    f"waveform {b} has {wav.shape[0]} samples after speed perturbation; the pitch shift "
                    f"needs more than n_fft // 2 = {self.n_fft // 2}"
                )
        for semitones in sorted({p.semitones for p in params} - {0.0}):
            members = [b for b, p in enumerate(params) if p.semitones == semitones]
            self._pitch_shift_into(out, members, float(semitones))
        return out

    def _check_wav(self, wav, index: int) -> None:
        if not isinstance(wav, torch.Tensor) or wav.dim() != 1:
            shape = list(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
            raise ValueError(f"waveform {index} must be a 1-D tensor [T] (one mono clip), got {shape}")
        if wav.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"waveform {index} must be float32 or float64 (convert with .float()), got {wav.dtype}"
            )
        if wav.shape[0] <= self.n_fft // 2:
            raise ValueError(f"waveform {index} has {wav.shape[0]} samples; need more than {self.n_fft // 2}")

    def _cached(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _resample_into(self, out: list, members: list[int], orig: int, new: int) -> None:
        device, dtype = out[members[0]].device, out[members[0]].dtype
        resampler = self._cached(
            ("resample", orig, new, device, dtype), lambda: SincResampler(orig, new, device, dtype)
        )
        lengths = [out[b].shape[0] for b in members]
        stacked = torch.nn.utils.rnn.pad_sequence([out[b] for b in members], batch_first=True)
        for b, wav in zip(members, resampler(stacked, lengths), strict=True):
            out[b] = wav

    def _pitch_shift_into(self, out: list, members: list[int], semitones: float) -> None:
        """torchaudio's pitch_shift on ``out[b]`` for ``b`` in ``members``, batched, in place in ``out``."""
        device, dtype = out[members[0]].device, out[members[0]].dtype
        n_fft, hop = self.n_fft, self.hop
        window = self._cached(
            ("window", device, dtype), lambda: torch.hann_window(n_fft, device=device, dtype=dtype)
        )
        phase_advance = self._cached(
            ("phase_advance", device, dtype),
            lambda: torch.linspace(0, math.pi * hop, n_fft // 2 + 1, device=device, dtype=dtype)[:, None],
        )
        rate = 2.0 ** (-semitones / 12)
        lengths = [out[b].shape[0] for b in members]
        # STFT with center=True, done per clip's own reflect padding so that a batch equals single calls
        padded = [F.pad(out[b][None], (n_fft // 2, n_fft // 2), mode="reflect")[0] for b in members]
        spec = torch.stft(
            torch.nn.utils.rnn.pad_sequence(padded, batch_first=True),
            n_fft,
            hop,
            window=window,
            center=False,
            return_complex=True,
        )
        frames = torch.tensor([1 + n // hop for n in lengths], device=device)
        # frames past a clip's end are +0 (torch.where, not a product: -0.0 real parts would have angle pi)
        valid = torch.arange(spec.shape[-1], device=device)[None, :] < frames[:, None]
        spec = torch.where(valid[:, None, :], spec, torch.zeros((), dtype=spec.dtype, device=device))
        stretched = phase_vocoder(spec, rate, phase_advance)
        stretch_frames = torch.tensor([math.ceil((1 + n // hop) / rate) for n in lengths], device=device)
        stretch_lengths = [int(round(n / rate)) for n in lengths]
        signal = self._istft(stretched, stretch_frames, window, max(stretch_lengths))
        resampler = self._cached(
            ("resample", int(self.sample_rate / rate), self.sample_rate, device, dtype),
            lambda: SincResampler(int(self.sample_rate / rate), self.sample_rate, device, dtype),
        )
        for b, n, wav in zip(members, lengths, resampler(signal, stretch_lengths), strict=True):
            out[b] = wav[:n] if wav.shape[0] >= n else F.pad(wav, (0, n - wav.shape[0]))

    def _istft(
        self, spec: torch.Tensor, frames: torch.Tensor, window: torch.Tensor, length: int
    ) -> torch.Tensor:
        """torch.istft (center=True) of ``spec [B, F, S]`` (``frames[b]`` valid) -> ``[B, length]``.

        Overlap-add and window-envelope normalisation per clip, so that trailing frames of longer clips in
        the batch do not change a shorter clip's envelope.
        """
        n_fft, hop = self.n_fft, self.hop
        valid = (torch.arange(spec.shape[-1], device=spec.device)[None, :] < frames[:, None]).to(window.dtype)
        pieces = torch.fft.irfft(spec, n=n_fft, dim=1) * window[None, :, None]  # frames past a clip are 0
        total = n_fft + hop * (spec.shape[-1] - 1)
        fold = dict(output_size=(1, total), kernel_size=(1, n_fft), stride=(1, hop))
        signal = F.fold(pieces, **fold)[:, 0, 0]
        envelope = F.fold(window.pow(2)[None, :, None] * valid[:, None, :], **fold)[:, 0, 0]
        signal = torch.where(envelope > 1e-11, signal / torch.where(envelope > 1e-11, envelope, 1.0), 0.0)
        signal = signal[:, n_fft // 2 : n_fft // 2 + length]
        return F.pad(signal, (0, length - signal.shape[1]))
