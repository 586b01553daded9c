"""Every hidden layer of an upstream on the probe's clips: extracted once, written to disk as it comes, read
back memory-mapped.

An upstream is named as for s3prl: ``name`` or ``name:ckpt`` (a local file or a URL), and loaded with
s3prl's public ``S3PRLUpstream(name, path_or_url=ckpt)`` (:mod:`.bases` turns any ``--ckpt`` of fine-tuning
into such a name). Clips go through it batched by length (bf16 autocast on CUDA); each clip's features are
``[L, F, C]`` (layers, frames, channels), each layer normalised over its channels first when asked (the
per-layer normalisation, done once here rather than at every head step), stored as float16.

Cache: ``<cache>/<name>-<key>.f16`` (the clips' features one after another) and ``<name>-<key>.json`` (where
each clip starts, its frames), keyed by the upstream name, the checkpoint's SHA-256, the list of clips and
the normalisation. Each batch of clips is written as soon as it is extracted (to ``.f16.partial``, renamed
when complete, the index written last), so extraction holds one batch, never the whole set. A later probe
of the same upstream on the same clips reads the cache instead of running the model. A cache that cannot
be read (truncated, not ours) is logged as a warning and computed again (documented fallback): the cache is
only ever a copy.

:class:`FeatureStore` reads it memory-mapped: ``store[i]`` is a ``[L, F, C]`` tensor over the file's pages,
and :meth:`FeatureStore.release` drops the pages read so far from the process (the operating system keeps
them cached while it has memory to spare). The head releases after every step, so the resident memory holds
one batch of clips, whatever the hours of audio.

Example::

    >>> spec = UpstreamSpec.parse("hubert_local:base.pt")  # doctest: +SKIP
    >>> feats = load_or_extract(spec, clips, torch.device("cpu"), Path("probe/cache"))  # doctest: +SKIP
    >>> feats[0].shape  # [layers, frames, channels]  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from s3prl_laser.data import read_audio
from s3prl_laser.errors import UserInputError
from s3prl_laser.probe.clips import Clip

logger = logging.getLogger("s3prl_laser.probe")
BATCH_SECONDS = 160.0  # audio per forward pass (sum over the batch of its longest clip)
CACHE_VERSION = 2


@dataclass(frozen=True)
class UpstreamSpec:
    name: str  # an entry of s3prl.hub
    ckpt: str | None  # a local path or URL, or None for the entry's default

    @classmethod
    def parse(cls, text: str) -> UpstreamSpec:
        name, _, ckpt = text.partition(":")
        if ckpt and "://" not in ckpt:
            ckpt = str(Path(ckpt).expanduser().absolute())
        return cls(name, ckpt or None)

    def __str__(self) -> str:
        return self.name if self.ckpt is None else f"{self.name}:{self.ckpt}"


def check_upstream(spec: UpstreamSpec) -> None:
    """``UserInputError`` for a name s3prl does not know or a local checkpoint that does not exist."""
    import s3prl.hub

    from s3prl_laser.plugin.registration import register

    register()  # idempotent; done by the start-up hook when the package is installed
    options = s3prl.hub.options()
    if spec.name not in options:
        close = difflib.get_close_matches(spec.name, options, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see s3prl.hub.options())"
        raise UserInputError(f"--upstream {spec}: s3prl has no upstream named {spec.name!r}{hint}")
    if spec.ckpt is not None and "://" not in spec.ckpt and not Path(spec.ckpt).is_file():
        what = "is a folder, not a checkpoint file" if Path(spec.ckpt).is_dir() else "does not exist"
        raise UserInputError(f"--upstream {spec}: checkpoint {spec.ckpt} {what}")


def file_sha256(path: str | None) -> str:
    """SHA-256 of a local file; the URL or ``"default"`` itself for anything else."""
    if path is None or "://" in path:
        return path or "default"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(spec: UpstreamSpec, clips: list[Clip], layer_norm: bool = True) -> str:
    payload = json.dumps(
        [CACHE_VERSION, spec.name, file_sha256(spec.ckpt), [c.path for c in clips], bool(layer_norm)]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class _PackedClips(Sequence):
    """Clips' ``[L, F_i, C]`` features one after another in one flat tensor ``_all``: clip ``i`` starts at
    ``offsets[i]`` and has ``frames[i]`` frames; ``store[i]`` is a view."""

    layers: int
    dim: int
    offsets: list[int]
    frames: list[int]
    _all: torch.Tensor

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self.frames):
            raise IndexError(i)
        count = self.layers * self.frames[i] * self.dim
        flat = self._all[self.offsets[i] : self.offsets[i] + count]
        return flat.view(self.layers, self.frames[i], self.dim)


class FeatureStore(_PackedClips):
    """The features of a cache file: ``store[i]`` is clip ``i``'s ``[L, F, C]`` float16 tensor, memory-mapped
    (read from disk when first touched); :meth:`release` gives the pages touched back."""

    def __init__(self, data: Path, index: dict) -> None:
        self.layers, self.dim = int(index["layers"]), int(index["dim"])
        self.offsets, self.frames = list(index["offsets"]), list(index["frames"])
        expected = 2 * self.layers * self.dim * sum(self.frames)
        size = data.stat().st_size
        if size != expected:
            raise ValueError(f"{size} bytes, the index describes {expected}")
        with open(data, "rb") as f:  # private mapping: tensors over it may be written, the file never is
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._all = torch.frombuffer(self._map, dtype=torch.float16)

    def release(self) -> None:
        """Drop the pages read so far from this process (read again from the file or its cache if needed)."""
        self._map.madvise(mmap.MADV_DONTNEED)


class DeviceStore(_PackedClips):
    """A :class:`FeatureStore` copied whole into one tensor on ``device`` (a GPU), so that head steps read
    their clips there instead of copying about 200 MB from the host at every step. The copy goes through in
    chunks, giving the host pages back after each, so it adds no resident host memory."""

    CHUNK = 1 << 27  # values per host-to-device copy (256 MB of float16)

    def __init__(self, store: FeatureStore, device: torch.device) -> None:
        self.layers, self.dim = store.layers, store.dim
        self.offsets, self.frames = store.offsets, store.frames
        self._all = torch.empty(store._all.numel(), dtype=store._all.dtype, device=device)
        for start in range(0, store._all.numel(), self.CHUNK):
            self._all[start : start + self.CHUNK].copy_(store._all[start : start + self.CHUNK])
            store.release()


def on_device(feats: Sequence, device: torch.device, share: float = 0.5) -> Sequence:
    """``feats`` on a GPU as a :class:`DeviceStore` when they take at most ``share`` of its free memory
    (about 4.8 GB for a base model at the probe's defaults, 12 GB for a large one); otherwise, and on the
    CPU, ``feats`` as they are (read from the memory-mapped file at every step)."""
    if device.type != "cuda" or not isinstance(feats, FeatureStore):
        return feats
    size = feats._all.numel() * feats._all.element_size()
    index = device.index if device.index is not None else torch.cuda.current_device()  # older torch wants one
    free, _ = torch.cuda.mem_get_info(index)
    if size > share * free:
        logger.info(
            "probe: features of %.1f GB stay on the host (%.1f GB free on %s); each head step copies "
            "its clips",
            size / 1e9,
            free / 1e9,
            device,
        )
        return feats
    return DeviceStore(feats, device)


class Rows(Sequence):
    """Clips ``rows`` of ``feats`` (a store or a list), with the store's :meth:`release`."""

    def __init__(self, feats: Sequence, rows: Sequence[int]) -> None:
        self.feats, self.rows = feats, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.feats[self.rows[i]]

    def release(self) -> None:
        release(self.feats)


def release(feats: Sequence) -> None:
    """:meth:`FeatureStore.release` for a store (or rows of one); nothing for a list held in memory."""
    if hasattr(feats, "release"):
        feats.release()


class FeatureWriter:
    """Writes clips' features into ``<path>`` as they come (``.partial`` until :meth:`finish`)."""

    def __init__(self, path: Path, count: int, meta: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.meta = path, meta
        self.partial = path.with_name(path.name + ".partial")
        self.file = open(self.partial, "wb")  # noqa: SIM115 - closed by finish() or abort()
        self.offsets: list[int | None] = [None] * count
        self.frames: list[int | None] = [None] * count
        self.shape: tuple[int, int] | None = None
        self.position = 0  # in float16 elements

    def write(self, i: int, clip: torch.Tensor) -> None:
        """Clip ``i``'s ``[L, F, C]`` features (any float dtype; stored as float16)."""
        layers, frames, dim = clip.shape
        self.shape = self.shape or (layers, dim)
        if self.shape != (layers, dim):
            raise ValueError(f"clip {i}: {layers} layers x {dim} channels, not {self.shape}")
        data = clip.to(torch.float16).contiguous().numpy()
        self.file.write(data.tobytes())
        self.offsets[i], self.frames[i] = self.position, frames
        self.position += data.size

    def finish(self) -> FeatureStore:
        """Close, check every clip was written, rename into place, write the index; the store."""
        missing = [i for i, f in enumerate(self.frames) if f is None]
        if missing or self.shape is None:
            raise ValueError(f"clips without features: {missing[:5]}")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.partial.replace(self.path)
        index = {**self.meta, "layers": self.shape[0], "dim": self.shape[1],
                 "offsets": self.offsets, "frames": self.frames}  # fmt: skip
        index_path = self.path.with_suffix(".json")
        tmp = index_path.with_name(index_path.name + ".partial")
        tmp.write_text(json.dumps(index))
        tmp.replace(index_path)
        return FeatureStore(self.path, index)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def open_store(path: Path, count: int) -> FeatureStore:
    """The store at ``path`` (``.f16`` + ``.json``); ``ValueError``/``OSError`` when it is not a complete
    cache of ``count`` clips."""
    index = json.loads(path.with_suffix(".json").read_text())
    if index.get("version") != CACHE_VERSION or len(index["frames"]) != count:
        raise ValueError(f"holds {len(index.get('frames', []))} clips of version {index.get('version')}")
    return FeatureStore(path, index)


def load_or_extract(
    spec: UpstreamSpec, clips: list[Clip], device: torch.device, cache: Path, layer_norm: bool = True
) -> FeatureStore:
    """Features ``[L, F, C]`` (float16) of each clip, from ``cache`` when it holds them, else extracted into
    it; each layer normalised over its channels when ``layer_norm``."""
    path = cache / f"{spec.name}-{cache_key(spec, clips, layer_norm)}.f16"
    if path.with_suffix(".json").is_file():
        try:
            store = open_store(path, len(clips))
            logger.info("%s: features of %d clips read from the cache %s", spec, len(clips), path)
            return store
        except Exception as error:  # noqa: BLE001 - any unreadable cache is recomputed (documented)
            logger.warning(
                "cache %s is unreadable (%s): computing the features again", path, error.__class__.__name__
            )
    meta = {"version": CACHE_VERSION, "upstream": str(spec), "clips": [c.path for c in clips],
            "layer_norm": bool(layer_norm)}  # fmt: skip
    writer = FeatureWriter(path, len(clips), meta)
    try:
        extract(spec, clips, device, writer=writer, layer_norm=layer_norm)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def length_batches(clips: list[Clip], batch_seconds: float) -> list[list[int]]:
    """Clip indices grouped by length (longest first) so that ``count x longest <= batch_seconds``."""
    order = sorted(range(len(clips)), key=lambda i: -clips[i].seconds)
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * clips[batches[-1][0]].seconds <= batch_seconds:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def extract(
    spec: UpstreamSpec,
    clips: list[Clip],
    device: torch.device,
    batch_seconds: float = BATCH_SECONDS,
    writer: FeatureWriter | None = None,
    layer_norm: bool = False,
) -> list[torch.Tensor] | None:
    """Run the upstream on ``clips``: each clip's ``[L, F, C]`` float16 features go to ``writer`` as its
    batch is done (then None is returned), or into a list in the order of ``clips`` (no writer). The model
    is freed on return."""
    from s3prl.nn import S3PRLUpstream

    check_upstream(spec)
    upstream = S3PRLUpstream(spec.name, path_or_url=spec.ckpt).to(device).eval()
    features: list[torch.Tensor | None] = [None] * len(clips)
    batches = length_batches(clips, batch_seconds)
    with tqdm(total=len(clips), desc=f"features {spec.name}", unit="clip", leave=False, disable=None) as bar:
        for batch in batches:
            wavs = [read_audio(clips[i].path) for i in batch]
            lengths = torch.tensor([w.shape[0] for w in wavs])
            padded = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                hidden, hidden_lengths = upstream(padded, lengths.to(device))
            stacked = torch.stack([h.float() for h in hidden], dim=1)  # [B, L, F, C]
            del hidden
            if layer_norm:
                stacked = torch.nn.functional.layer_norm(stacked, stacked.shape[-1:])
            stacked = stacked.to(torch.float16).cpu()
            for row, i in enumerate(batch):
                clip = stacked[row, :, : int(hidden_lengths[0][row])]
                if writer is not None:
                    writer.write(i, clip)
                else:
                    features[i] = clip.clone()
            del stacked
            bar.update(len(batch))
    del upstream
    return None if writer is not None else features
