"""Audio data for LASER: find clips, read and crop them, make (clean, perturbed) pairs, bucket by length.

Three kinds of ``--data``:

* a LibriSpeech root (a folder holding ``train-clean-100/`` etc.), or the folder holding ``LibriSpeech/``:
  the splits named in ``data_subsets``;
* any other folder: every ``.flac``/``.wav`` below it;
* a manifest file: one audio path per line (relative paths are relative to the manifest), optionally
  followed by whitespace and the length in samples (then the file is not opened while scanning).

Every random choice about a clip (crop offset, speed factor, pitch sign, swap) comes from a generator
seeded by ``(seed, epoch, index)``, so a batch is the same whichever worker builds it and after a resume.
A clip that cannot be read, or is shorter than ``min_samples`` (before or after perturbation), is skipped
with a warning and counted in ``PairBatch.skipped``; it never stops the run. Training refuses clips under
LibriSpeech ``dev-*``/``test-*`` split folders, whichever way they were found: through links to folders or
files, and spelled in any case or with ``_``; and dev/test audio elsewhere, by identity: a hard link of a
dev/test file, or a file named as an utterance of a dev/test speaker (:func:`refuse_held_out`).

Example::

    >>> items = find_audio("LibriSpeech", ["train-clean-100"])           # doctest: +SKIP
    >>> sampler = BucketBatchSampler([i.num_samples for i in items], batch_size=8, seed=0)
    >>> dataset = PairDataset(items, perturb=LaserPerturbation.from_preset("hubert"))  # doctest: +SKIP
    >>> batch = collate_pairs([dataset[key] for key in next(iter(sampler))])  # doctest: +SKIP
    >>> batch.wavs.shape  # [2B, T]: the B first views, then the B second views
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import soundfile
import torch

from s3prl_laser.errors import UserInputError
from s3prl_laser.objective.perturb import LaserPerturbation, PerturbParams, SincResampler

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".flac", ".wav")
LIBRISPEECH_SPLITS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)
HELD_OUT_PREFIXES = ("dev-", "test-")
# LibriSpeech's split folder names and Mini LibriSpeech's (train-clean-5, dev-clean-2)
_SPLIT_NAME = re.compile(r"^(train|dev|test)-(clean|other)(-\d+)?$")
_SEED_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


@dataclass(frozen=True)
class AudioItem:
    """One audio file and its length in samples at the target rate (``None`` = not known yet)."""

    path: str
    num_samples: int | None = None


@dataclass
class PairBatch:
    """A collated batch of pairs.

    Attributes:
        wavs: ``[2B, T]`` float32, zero-padded; rows ``0..B-1`` are the first views, ``B..2B-1`` the second.
            While ``perturb_params`` is set (perturbation left to the training device): ``[B, T]``, the clean
            crops only; :func:`complete_pairs` makes the ``[2B, T]`` batch from them.
        lengths: ``[2B]`` (or ``[B]`` while pending) int64 valid samples per row.
        skipped: reason -> number of clips of this batch that were dropped ("unreadable", "too_short").
        position: ``(epoch, batch)`` of this batch in the sampler's order.
        part: ``(part, parts)``: this is micro-batch ``part`` of the ``parts`` that the batch budget cut the
            batch at ``position`` into (``(0, 1)`` when it is whole).
        cropped: clips of this batch cut shorter by the batch budget (``max_batch_seconds``).
        perturb_params: per pair, the drawn speed factor and pitch shift, while the perturbation is pending.
        swap: ``[B]`` bool, per pair, whether the perturbed view comes first (while pending).
    """

    wavs: torch.Tensor
    lengths: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)
    position: tuple[int, int] = (0, 0)
    part: tuple[int, int] = (0, 1)
    cropped: int = 0
    perturb_params: list[PerturbParams] | None = None
    swap: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.wavs.shape[0] if self.perturb_params is not None else self.wavs.shape[0] // 2

    def pin_memory(self) -> PairBatch:
        """A copy in page-locked memory (the DataLoader calls this with ``pin_memory=True``)."""
        return dataclasses.replace(self, wavs=self.wavs.pin_memory(), lengths=self.lengths.pin_memory())


def find_audio(source: str | os.PathLike, subsets: Sequence[str] = ("train-clean-100",)) -> list[AudioItem]:
    """List the audio of ``source`` (LibriSpeech root or its parent, folder or manifest), sorted by path.

    A folder holding ``LibriSpeech/`` with split folders (the layout of torchaudio and the official LASER
    code) is read as that LibriSpeech root, so only ``subsets`` are listed. Raises ``ValueError`` naming the
    path when it does not exist or holds no audio.
    """
    root = Path(os.path.abspath(os.path.expanduser(source)))  # listed paths are absolute
    if not root.exists():
        raise UserInputError(f"--data {root}: no such file or directory")
    if root.is_file():
        items = read_manifest(root)
    elif librispeech_root(root) is not None:
        root = librispeech_root(root)
        missing = [s for s in subsets if not (root / s).is_dir()]
        if missing:
            raise UserInputError(
                f"--data {root} looks like a LibriSpeech root but lacks {missing}; "
                f"set data_subsets to some of {[s for s in LIBRISPEECH_SPLITS if (root / s).is_dir()]}"
            )
        items = [AudioItem(str(p)) for s in subsets for p in _audio_files(root / s)]
    else:
        items = [AudioItem(str(p)) for p in _audio_files(root)]
    if not items:
        raise UserInputError(
            f"--data {root}: no audio found (looked for {', '.join(AUDIO_SUFFIXES)} files)"
        )
    return sorted(items, key=lambda item: item.path)


def librispeech_root(folder: Path) -> Path | None:
    """``folder`` if it holds LibriSpeech split folders, ``folder/LibriSpeech`` if that does, else None."""
    for candidate in (folder, folder / "LibriSpeech"):
        if any((candidate / split).is_dir() for split in LIBRISPEECH_SPLITS):
            return candidate
    return None


def split_of(path: str) -> str | None:
    """The LibriSpeech-style split folder (``train-clean-100``, ``dev-other``...) holding a path, or None.

    Folder names are matched regardless of case and of ``-``/``_`` (``Test-Clean``, ``dev_other``) and
    returned in LibriSpeech's spelling (``test-clean``, ``dev-other``).
    """
    for part in reversed(path.split(os.sep)[:-1]):  # string work: this runs once per clip of a corpus
        name = part.lower().replace("_", "-")
        if _SPLIT_NAME.match(name):
            return name
    return None


def is_held_out(path: str, real_folder: Callable[[str], str] = os.path.realpath) -> bool:
    """True if ``path``, as given or with its links resolved (folders and file), lies under a LibriSpeech
    ``dev-*``/``test-*`` split folder: a link named ``mine`` to ``test-clean`` is still ``test-clean``.

    ``real_folder`` resolves a folder (pass a cached one for many paths: one ``lstat`` per file then).
    """
    if os.path.islink(path):
        real = os.path.realpath(path)
    else:
        folder, name = os.path.split(path)
        real = os.path.join(real_folder(folder), name)
    return any((split_of(candidate) or "").startswith(HELD_OUT_PREFIXES) for candidate in (path, real))


_UTTERANCE = re.compile(r"^(\d+)-(\d+)-(\d+)$")  # LibriSpeech's SPEAKER-CHAPTER-UTT file names


@functools.lru_cache(maxsize=1)
def held_out_speakers() -> dict[str, str]:
    """LibriSpeech's dev/test speakers: ``{speaker id: split}``, shipped with the package (public facts of
    the corpus; see ``assets/librispeech_heldout_speakers.txt``)."""
    import importlib.resources

    asset = importlib.resources.files("s3prl_laser") / "assets" / "librispeech_heldout_speakers.txt"
    text = asset.read_text()
    speakers = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            split, _, ids = line.partition(":")
            speakers.update(dict.fromkeys(ids.split(), split.strip()))
    return speakers


def _speakers_file(root: Path) -> dict[str, str]:
    """The dev/test speakers that a LibriSpeech root's own ``SPEAKERS.TXT`` lists (``ID | SEX | SUBSET |
    ...``); none when it has none."""
    try:
        text = (root / "SPEAKERS.TXT").read_text(errors="replace")
    except OSError:
        return {}
    speakers = {}
    for line in text.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) >= 3 and fields[0].isdigit() and fields[2].startswith(HELD_OUT_PREFIXES):
            speakers[fields[0]] = fields[2]
    return speakers


def _nearby_roots(items: Sequence[AudioItem], source: str | os.PathLike) -> list[Path]:
    """LibriSpeech roots whose dev/test audio the clips could be hard links of: ``source`` if it is one,
    and the folder above each split folder that holds a clip (``LS`` of ``LS/train-clean-100/...``)."""
    roots = set()
    source = Path(source)
    if source.is_dir() and (root := librispeech_root(source)) is not None:
        roots.add(root)
    folders = {os.path.dirname(item.path) for item in items}
    for folder in folders:
        parts = folder.split(os.sep)
        for depth in range(len(parts) - 1, 0, -1):
            if _SPLIT_NAME.match(parts[depth].lower().replace("_", "-")):
                roots.add(Path(os.sep.join(parts[:depth]) or os.sep))
                break
    return sorted(roots)


def _held_out_files(roots: list[Path]) -> dict[tuple[int, int], str]:
    """``{(st_dev, st_ino): path}`` of the dev/test audio under ``roots`` that has other names (hard links:
    more than one link); a file with one link cannot be a clip elsewhere."""
    found = {}
    for root in roots:
        try:
            splits = [p for p in root.iterdir() if p.is_dir() and _is_held_out_split(p.name)]
        except OSError:
            continue
        for split in splits:
            for path in _audio_files(split):
                stat = path.stat()
                if stat.st_nlink > 1:
                    found[(stat.st_dev, stat.st_ino)] = str(path)
    return found


def _is_held_out_split(name: str) -> bool:
    name = name.lower().replace("_", "-")
    return bool(_SPLIT_NAME.match(name)) and name.startswith(HELD_OUT_PREFIXES)


def held_out_reason(
    path: str, speakers: dict[str, str], linked: dict[tuple[int, int], str], real_folder=os.path.realpath
) -> str | None:
    """Why ``path`` is LibriSpeech dev/test audio (None if it is not): it lies under a dev/test split folder
    (:func:`is_held_out`), it is the same file as a dev/test file (``linked``: hard links), or its name is a
    LibriSpeech utterance id of a dev/test speaker (``speakers``: a copy keeps its name)."""
    if is_held_out(path, real_folder):
        real = os.path.realpath(path)
        split = split_of(path) if (split_of(path) or "").startswith(HELD_OUT_PREFIXES) else split_of(real)
        return f"it lies under {split}" + ("" if real == path else f" (it is {real})")
    if linked:
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        if stat is not None and stat.st_nlink > 1 and (same := linked.get((stat.st_dev, stat.st_ino))):
            return f"it is the same file as {same} of {split_of(same)} (a hard link)"
    match = _UTTERANCE.match(os.path.splitext(os.path.basename(path))[0])
    if match and match.group(1) in speakers:
        speaker = match.group(1)
        return f"its name is utterance {match.group(0)} of {speakers[speaker]} speaker {speaker}"
    return None


def refuse_held_out(items: Sequence[AudioItem], source: str | os.PathLike) -> None:
    """Raise ``UserInputError`` if any clip is LibriSpeech dev/test audio, however it is reached: under a
    ``dev-*``/``test-*`` split folder (links resolved, any spelling), the same file as one there (a hard
    link), or a file named as an utterance of a dev/test speaker (a copy), wherever it lies
    (:func:`held_out_reason`).

    Training on the audio that SUPERB scores on would inflate every downstream result. The message names
    the first such clip, the split it belongs to, and the config key that allows it on purpose
    (``allow_held_out_splits``).
    """
    real_folder = functools.lru_cache(maxsize=None)(os.path.realpath)  # a corpus has few folders
    roots = _nearby_roots(items, source)
    speakers = dict(held_out_speakers())
    for root in roots:
        speakers.update(_speakers_file(root))
    linked = _held_out_files(roots)
    reasons = ((item.path, held_out_reason(item.path, speakers, linked, real_folder)) for item in items)
    held_out = [(path, reason) for path, reason in reasons if reason is not None]
    if held_out:
        first, reason = held_out[0]
        raise UserInputError(
            f"--data {source}: {len(held_out)} of {len(items)} clips are LibriSpeech dev/test audio (first: "
            f"{first}: {reason}); SUPERB scores on these splits, so training on them contaminates the "
            "evaluation. Point --data at the training audio only, or set allow_held_out_splits=true if you "
            "mean it"
        )


def describe_splits(items: Sequence[AudioItem], sample_rate: int) -> str:
    """``"train-clean-100: 28539 clips, 100.59 h"``-style summary of the clips per split folder."""
    clips: Counter = Counter()
    samples: Counter = Counter()
    for item in items:
        split = split_of(item.path) or "no split folder"
        clips[split] += 1
        samples[split] += item.num_samples or 0
    return "; ".join(f"{s}: {clips[s]} clips, {samples[s] / sample_rate / 3600:.2f} h" for s in sorted(clips))


def measure_lengths(
    items: Sequence[AudioItem], sample_rate: int = 16000, jobs: int = 1
) -> tuple[list[AudioItem], int]:
    """Fill in unknown lengths from the file headers, reading ``jobs`` headers at a time (threads: the
    reads wait on the disk or the network, not on Python); unreadable files are dropped with a warning.

    Returns the kept items, in their order, and how many were dropped.
    """
    todo = [item.path for item in items if item.num_samples is None]
    if jobs > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            probed = dict(zip(todo, pool.map(_header_frames, todo), strict=True))
    else:
        probed = {path: _header_frames(path) for path in todo}
    kept, dropped = [], 0
    for item in items:
        if item.num_samples is not None:
            kept.append(item)
            continue
        header = probed[item.path]
        if isinstance(header, Exception):
            logger.warning("skipping unreadable audio %s: %s", item.path, header)
            dropped += 1
            continue
        frames, rate = header
        kept.append(AudioItem(item.path, math.ceil(frames * sample_rate / rate)))
    if not kept:
        raise UserInputError(
            f"none of the {len(items)} audio files could be read (first: {items[0].path})"
        )
    return kept, dropped


def _header_frames(path: str) -> tuple[int, int] | Exception:
    """``(frames, sample_rate)`` from the file's header, or the error that reading it raised."""
    try:
        info = soundfile.info(path)
    except (RuntimeError, OSError) as error:  # soundfile raises LibsndfileError (a RuntimeError)
        return error
    return info.frames, info.samplerate


def read_audio(path: str, sample_rate: int = 16000) -> torch.Tensor:
    """Read a file as a mono float32 waveform ``[T]`` at ``sample_rate`` (averaging channels, resampling)."""
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    wav = torch.from_numpy(data).mean(dim=1)
    if rate != sample_rate:
        # torchaudio's resampling maths (see SincResampler), without depending on torchaudio
        wav = SincResampler(rate, sample_rate, wav.device, wav.dtype)(wav[None], [len(wav)])[0]
    return wav


def clip_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, epoch, index)`` alone (independent of worker and rank)."""
    mixed = 0
    for value, multiplier in zip((seed, epoch, index), _SEED_MIX, strict=True):
        mixed = (mixed ^ (value * multiplier)) * 0x2545F4914F6CDD1D % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def random_crop(wav: torch.Tensor, max_samples: int | None, generator: torch.Generator) -> torch.Tensor:
    """Crop ``wav [T]`` to at most ``max_samples`` at a random offset (``None``: no crop)."""
    if max_samples is None or wav.shape[-1] <= max_samples:
        return wav
    start = int(torch.randint(0, wav.shape[-1] - max_samples + 1, (), generator=generator))
    return wav[..., start : start + max_samples]


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset of (view, view) pairs, indexed by ``(index, epoch, batch[, part, parts])`` keys.

    ``dataset[(i, epoch, batch)]`` reads clip ``i`` (the views depend on ``(seed, epoch, i)`` only, not on the
    batch or micro-batch it is in), crops it to ``max_seconds`` and ``budget_limit``
    samples, perturbs a copy with ``perturb(wav, generator)`` and swaps the two with probability
    ``swap_prob``. It returns a dict with ``a``, ``b`` (``[T]`` tensors) or, for a skipped clip,
    ``a = b = None`` and ``skip`` naming the reason; ``cropped`` tells whether the budget cut the clip.

    With ``perturb_in_worker=False`` the perturbation is only drawn (``perturb.sample_params``, then the
    swap, the same draws in the same order): ``b`` is None and ``params``, ``swap`` are returned for
    :func:`complete_pairs` to apply on the training device, batched. ``perturb`` must then be a
    :class:`~s3prl_laser.objective.perturb.LaserPerturbation`.
    """

    def __init__(
        self,
        items: Sequence[AudioItem],
        perturb: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        sample_rate: int = 16000,
        max_seconds: float | None = None,
        min_samples: int = 400,
        swap_prob: float = 0.5,
        seed: int = 0,
        budget_limit: int | None = None,
        perturb_in_worker: bool = True,
    ) -> None:
        self.items = list(items)
        self.perturb = perturb
        self.sample_rate = sample_rate
        self.max_samples = None if max_seconds is None else int(max_seconds * sample_rate)
        self.budget_limit = budget_limit
        self.min_samples = min_samples
        self.swap_prob = swap_prob
        self.seed = seed
        self.perturb_in_worker = perturb_in_worker

    def __len__(self) -> int:
        return len(self.items)

    def crop_limit(self) -> int | None:
        limits = [n for n in (self.max_samples, self.budget_limit) if n is not None]
        return min(limits) if limits else None

    def __getitem__(self, key: tuple[int, ...]) -> dict:
        index, epoch, batch, *part = key
        path = self.items[index].path
        sample = {"a": None, "b": None, "skip": None, "position": (epoch, batch), "cropped": False,
                  "part": tuple(part) or (0, 1)}  # fmt: skip
        try:
            wav = read_audio(path, self.sample_rate)
        except (RuntimeError, OSError, ValueError) as error:
            logger.warning("skipping unreadable audio %s: %s", path, error)
            return {**sample, "skip": "unreadable"}
        generator = clip_generator(self.seed, epoch, index)
        clean = random_crop(wav, self.crop_limit(), generator)
        budget = self.budget_limit
        binding = budget is not None and (self.max_samples is None or budget < self.max_samples)
        sample["cropped"] = binding and wav.shape[-1] > budget  # cut by the budget, not by max_seconds
        if clean.shape[-1] < self.min_samples:
            logger.warning("skipping %s: %d samples < min_samples=%d", path, len(clean), self.min_samples)
            return {**sample, "skip": "too_short"}
        if self.perturb_in_worker:
            perturbed = self.perturb(clean, generator)
            perturbed_length = perturbed.shape[-1]
        else:
            params = self.perturb.sample_params(generator)
            perturbed_length = self.perturb.speed_length(clean.shape[-1], params.factor)
        if perturbed_length < self.min_samples:
            logger.warning("skipping %s: perturbed view has %d samples", path, perturbed_length)
            return {**sample, "skip": "too_short"}
        swap = bool(torch.rand((), generator=generator) < self.swap_prob)
        if not self.perturb_in_worker:
            return {**sample, "a": clean, "params": params, "swap": swap}
        if swap:
            clean, perturbed = perturbed, clean
        return {**sample, "a": clean, "b": perturbed}


def collate_pairs(samples: Sequence[dict]) -> PairBatch:
    """Pad the kept pairs of ``samples`` into one ``[2B, T]`` batch (``[B, T]`` clean crops while the
    perturbation is pending); count the skipped and the budget-cropped clips."""
    kept = [s for s in samples if s["skip"] is None]
    skipped = dict(Counter(s["skip"] for s in samples if s["skip"] is not None))
    pending = bool(kept) and kept[0]["b"] is None
    views = [s["a"] for s in kept] + ([] if pending else [s["b"] for s in kept])
    lengths = torch.tensor([v.shape[-1] for v in views], dtype=torch.long)
    wavs = torch.zeros(len(views), int(lengths.max()) if views else 0)
    for row, view in enumerate(views):
        wavs[row, : view.shape[-1]] = view
    batch = PairBatch(
        wavs=wavs, lengths=lengths, skipped=skipped, position=samples[0]["position"],
        part=samples[0].get("part", (0, 1)),
    )  # fmt: skip
    batch.cropped = sum(bool(s.get("cropped")) for s in samples)
    if pending:
        batch.perturb_params = [s["params"] for s in kept]
        batch.swap = torch.tensor([s["swap"] for s in kept], dtype=torch.bool)
    return batch


def complete_pairs(batch: PairBatch, perturb: LaserPerturbation, device: torch.device) -> PairBatch:
    """Move a pending batch's clean crops to ``device``, perturb them there in one batched call, and lay out
    the ``[2B, T]`` pair batch exactly as the workers would have (first views, then second views).

    A batch that is not pending is only moved to ``device``.
    """
    wavs = batch.wavs.to(device, non_blocking=True)
    lengths = batch.lengths.to(device, non_blocking=True)
    if batch.perturb_params is None:
        return dataclasses.replace(batch, wavs=wavs, lengths=lengths)
    clean = [wavs[b, :n] for b, n in enumerate(batch.lengths.tolist())]
    perturbed = perturb.apply_batch(clean, batch.perturb_params)
    swap = batch.swap.tolist()
    first = [p if s else c for c, p, s in zip(clean, perturbed, swap, strict=True)]
    second = [c if s else p for c, p, s in zip(clean, perturbed, swap, strict=True)]
    rows = first + second
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    row_lengths = torch.tensor([r.shape[-1] for r in rows], dtype=torch.long, device=device)
    return dataclasses.replace(batch, wavs=padded, lengths=row_lengths, perturb_params=None, swap=None)


def view_stretch(speed_factors: Sequence[float]) -> float:
    """How much longer than its clip a view can be: ``1 / min(speed_factors)`` if that is above 1, else 1."""
    return max(1.0, 1.0 / min(speed_factors))


def clip_limit_samples(
    max_seconds: float | None,
    max_batch_seconds: float | None,
    speed_factors: Sequence[float],
    sample_rate: int,
) -> int | None:
    """The longest clip a pair may keep, in samples: the crop ``max_seconds``, and at most what one pair
    (two views, each up to ``view_stretch`` times the clip) may take of the budget ``max_batch_seconds``.

    None when neither bounds it.
    """
    limits = []
    if max_seconds is not None:
        limits.append(int(max_seconds * sample_rate))
    if max_batch_seconds is not None:
        limits.append(int(max_batch_seconds * sample_rate / (2 * view_stretch(speed_factors))))
    return min(limits) if limits else None


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless, deterministic, length-bucketed batches cut into micro-batches under an audio budget, one
    shard per DDP rank.

    Each epoch: shuffle all clips (seeded by ``(seed, epoch)``), cut the order into chunks of
    ``batch_size * bucket_batches`` clips, sort each chunk by length (after the crop ``clip_limit``,
    ``max_seconds``) so that a batch holds clips of similar length (little padding), cut into batches of
    ``batch_size``, shuffle the batches. The batches are dealt round-robin to ``world_size`` ranks (the tail
    that does not divide evenly is dropped, so all ranks take the same number of steps). The budget never
    changes these batches: when ``max_batch_samples`` is set, each batch is only cut into micro-batches that
    run one after another and are accumulated into the batch's one optimizer step. The model sees
    ``[2b, T]`` with ``T`` up to ``view_stretch`` x the longest clip of the micro-batch, so ``b`` clips of at
    most ``L`` samples cost ``2 * b * ceil(L * view_stretch)``; a batch's clips (longest first) are cut
    greedily into as few micro-batches as keep that within the budget. Those costs count clips after the
    crop ``budget_limit`` too (one pair's share of the budget, see :func:`clip_limit_samples`), so one clip
    alone always fits. Iteration starts at ``start = (epoch, batch)`` (for resuming: always at a batch's
    first micro-batch) and yields, per micro-batch, a list of ``(index, epoch, batch, part, parts)`` keys for
    ``PairDataset`` (micro-batch ``part`` of the batch's ``parts``).

    Example::

        >>> sampler = BucketBatchSampler([16000, 8000, 24000, 4000], batch_size=2, seed=0)
        >>> len(next(iter(sampler)))
        2
        >>> budget = BucketBatchSampler([16000] * 4, batch_size=4, max_batch_samples=64000)
        >>> [len(b) for b in budget.epoch_batches(0)]  # the budget keeps the batch of 4 pairs ...
        [4]
        >>> [len(m) for m in budget.micro_batches(budget.epoch_batches(0)[0])]  # ... in 2 x 2 x 16000 samples
        [2, 2]
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        bucket_batches: int = 50,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: tuple[int, int] = (0, 0),
        max_batch_samples: int | None = None,
        view_stretch: float = 1.0,
        clip_limit: int | None = None,
        budget_limit: int | None = None,
    ) -> None:
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        if clip_limit is not None:
            self.lengths = self.lengths.clamp(max=clip_limit)
        self.budget_lengths = self.lengths if budget_limit is None else self.lengths.clamp(max=budget_limit)
        self.batch_size = batch_size
        self.bucket_batches = bucket_batches
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.max_batch_samples = max_batch_samples
        self.view_stretch = view_stretch
        self._cache: dict[int, list[list[int]]] = {}
        longest = int(self.budget_lengths.max())
        if max_batch_samples is not None and self.pair_cost(1, longest) > max_batch_samples:
            raise ValueError(
                f"one pair of {longest}-sample clips exceeds max_batch_samples={max_batch_samples}"
                "; pass budget_limit=clip_limit_samples(...) so that clips are cropped to the budget"
            )
        if self.batches_per_epoch(0) == 0:
            raise UserInputError(
                f"{len(self.lengths)} clips make {len(self._global_batches(0))} batches of "
                f"batch_size={batch_size}, fewer than the {world_size} processes: "
                "use more data or a smaller batch"
            )

    def pair_cost(self, pairs: int, longest: int) -> int:
        """Padded samples of a ``[2 * pairs, T]`` batch whose longest clip has ``longest`` samples."""
        return 2 * pairs * math.ceil(longest * self.view_stretch)

    def _global_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        chunk = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for begin in range(0, len(order), chunk):
            part = order[begin : begin + chunk]
            part = part[torch.argsort(self.lengths[part], descending=True, stable=True)].tolist()
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def micro_batches(self, batch: list[int]) -> list[list[int]]:
        """Cut a batch (clips sorted longest first) into consecutive micro-batches within the budget; the
        whole batch when there is no budget."""
        if self.max_batch_samples is None:
            return [batch]
        parts, current = [], []
        for index in batch:
            if current and self.pair_cost(
                len(current) + 1, int(self.budget_lengths[current[0]])
            ) > self.max_batch_samples:
                parts.append(current)
                current = []
            current.append(index)
        return parts + [current] if current else parts

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (lists of clip indices) for ``epoch``: one optimizer step each (per
        ``grad_accum_steps``), whatever the budget."""
        if epoch not in self._cache:
            batches = self._global_batches(epoch)
            usable = len(batches) - len(batches) % self.world_size
            self._cache[epoch] = batches[self.rank : usable : self.world_size]
            while len(self._cache) > 2:  # the loader may run an epoch ahead of the training loop
                del self._cache[next(iter(self._cache))]  # the least recently computed
        return self._cache[epoch]

    def batches_per_epoch(self, epoch: int) -> int:
        """This rank's number of batches in ``epoch``."""
        return len(self.epoch_batches(epoch))

    def next_position(self, position: tuple[int, int]) -> tuple[int, int]:
        """The sampler position right after the batch at ``position = (epoch, batch)``."""
        epoch, batch = position
        return (epoch + 1, 0) if batch + 1 >= self.batches_per_epoch(epoch) else (epoch, batch + 1)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int, int]]]:
        epoch, batch = self.start
        while True:
            batches = self.epoch_batches(epoch)
            for number in range(batch, len(batches)):
                parts = self.micro_batches(batches[number])
                for part, indices in enumerate(parts):
                    yield [(index, epoch, number, part, len(parts)) for index in indices]
            epoch, batch = epoch + 1, 0


def default_workers() -> int:
    """DataLoader workers per process: the CPUs this process may use, shared among the processes of this
    machine (torchrun's ``LOCAL_WORLD_SIZE``), less one for the training process itself; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)


def build_loader(
    dataset: PairDataset,
    sampler: BucketBatchSampler,
    num_workers: int,
    seed: int = 0,
    worker_init_fn: Callable[[int], None] | None = None,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> torch.utils.data.DataLoader:
    """DataLoader over ``sampler``'s batches; a private generator keeps the global RNG untouched.

    Workers are persistent and each keeps ``prefetch_factor`` batches ready; ``pin_memory`` (for CUDA)
    lets the batch's copy to the GPU run asynchronously.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=worker_init_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop a loader's worker processes now. Its persistent workers otherwise live as long as the loader,
    and an interpreter cannot exit while they do (they ignore SIGTERM: the main process stops a run).
    torch has no public call for this; its iterator's own shutdown is the one it runs when freed."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def _audio_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()]


def read_manifest(manifest: Path) -> list[AudioItem]:
    """Parse ``path [num_samples]`` lines into items with absolute paths (relative paths: relative to the
    manifest's folder, wherever the manifest was named from); blank lines
    and ``#`` comments are ignored. ``UserInputError`` names the file and line of a path that is not audio,
    or the file when it is an audio file itself or not text."""
    if manifest.suffix.lower() in AUDIO_SUFFIXES:
        raise UserInputError(
            f"--data {manifest} is one audio file; give the folder that holds the audio, or a manifest "
            "(one audio path per line)"
        )
    try:
        text = manifest.read_text()
    except UnicodeDecodeError:
        raise UserInputError(f"--data {manifest}: not a text manifest (one audio path per line)") from None
    folder, items = os.path.dirname(os.path.abspath(manifest)), []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        length = None
        if len(parts) == 2 and parts[1].isdigit():
            line, length = parts[0], int(parts[1])
        if not line.lower().endswith(AUDIO_SUFFIXES):
            raise UserInputError(f"manifest {manifest}, line {number}: {line!r} is not a .flac/.wav path")
        path = os.path.expanduser(line) if line.startswith("~") else line
        if not os.path.isabs(path):  # string work, no Path: a manifest may have a million lines
            path = os.path.normpath(os.path.join(folder, path))
        items.append(AudioItem(path, length))
    return items
