"""Every hidden layer of an upstream on the probe's clips: extracted once, kept on disk, reused.

An upstream is named as for s3prl: ``name`` or ``name:ckpt`` (a local file or a URL), and loaded with
s3prl's public ``S3PRLUpstream(name, path_or_url=ckpt)``. Clips go through it batched by length (bf16
autocast on CUDA); each clip's features are ``[L, F, C]`` (layers, frames, channels) in float16 on the CPU.

The cache file ``<cache>/<name>-<key>.pt`` is keyed by the upstream name, the checkpoint's SHA-256 and the
list of clips; a later probe of the same upstream on the same clips reads it instead of running the model.
A cache file that cannot be read (truncated, not ours) is logged as a warning and computed again
(documented fallback): the cache is only ever a copy.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from s3prl_laser.data import read_audio
from s3prl_laser.errors import UserInputError
from s3prl_laser.probe.clips import Clip

logger = logging.getLogger("s3prl_laser.probe")
BATCH_SECONDS = 160.0  # audio per forward pass (sum over the batch of its longest clip)
CACHE_VERSION = 1


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


def cache_key(spec: UpstreamSpec, clips: list[Clip]) -> str:
    payload = json.dumps([CACHE_VERSION, spec.name, file_sha256(spec.ckpt), [c.path for c in clips]])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def load_or_extract(
    spec: UpstreamSpec, clips: list[Clip], device: torch.device, cache: Path | None
) -> list[torch.Tensor]:
    """Features ``[L, F, C]`` (float16, CPU) of each clip, from ``cache`` when it holds them."""
    path = None if cache is None else cache / f"{spec.name}-{cache_key(spec, clips)}.pt"
    if path is not None and path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if len(stored["features"]) == len(clips):
                logger.info("%s: features of %d clips read from the cache %s", spec, len(clips), path)
                return stored["features"]
            logger.warning(
                "cache %s holds %d clips, not %d: computing again", path, len(stored["features"]), len(clips)
            )
        except Exception as error:  # noqa: BLE001 - any unreadable cache file is recomputed (documented)
            logger.warning(
                "cache %s is unreadable (%s): computing the features again", path, error.__class__.__name__
            )
    features = extract(spec, clips, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"upstream": str(spec), "clips": [c.path for c in clips], "features": features}, partial)
        partial.replace(path)
    return features


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
    spec: UpstreamSpec, clips: list[Clip], device: torch.device, batch_seconds: float = BATCH_SECONDS
) -> list[torch.Tensor]:
    """Run the upstream on ``clips``; ``[L, F, C]`` float16 CPU tensors in the order of ``clips``."""
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
            stacked = torch.stack([h.float() for h in hidden], dim=1).to(torch.float16).cpu()  # [B, L, F, C]
            for row, i in enumerate(batch):
                features[i] = stacked[row, :, : int(hidden_lengths[0][row])].clone()
            bar.update(len(batch))
    return features
