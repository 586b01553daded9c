"""Every base a fine-tuning run can start from, as an upstream the probe loads through s3prl.

``--upstream FAMILY:CKPT`` or ``--upstream FAMILY_local:CKPT`` (``FAMILY``: ``hubert`` or ``wavlm``) accepts
as ``CKPT`` anything ``python -m s3prl_laser.finetune --ckpt`` accepts, read by the same code
(:func:`s3prl_laser.models.sources.read_source`):

- an s3prl-format file: loaded as it is, with s3prl's ``FAMILY_local``;
- an original fairseq HuBERT file, a transformers model folder or a Hugging Face hub id: converted once to
  an s3prl-format copy in ``<cache>/bases/FAMILY-<key>.pt``, keyed by the SHA-256 of the source's content
  (the file, or the folder's files), then loaded with ``FAMILY_local``; a later probe of that content reuses
  it;
- one of s3prl's names (``wavlm_base_plus``, ``hubert_large_ll60k``, ...): s3prl's own entry of that name,
  after the checkpoint has been found in s3prl's download cache (or downloaded);
- nothing (``--upstream hubert``): s3prl's default, ``hubert_base`` / ``wavlm_base``.

Anything else (``hubert_laser:run/hubert_laser.pt``, ``wav2vec2``, a URL) goes to s3prl as written.
:func:`resolve_upstream` raises ``UserInputError`` (exit 2, one line) for a base it cannot load, and is
cheap enough to run at the start of a fine-tuning run (``probe: true``): reading the checkpoint once.

Example::

    >>> resolve_upstream("wavlm:hf/wavlm-base-plus", Path("probe/cache"))  # doctest: +SKIP
    UpstreamSpec(name='wavlm_local', ckpt='probe/cache/bases/wavlm-3f2c...pt')
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from s3prl_laser.errors import UserInputError
from s3prl_laser.probe.features import UpstreamSpec

logger = logging.getLogger("s3prl_laser.probe")
FAMILIES = ("hubert", "wavlm")


def family_of(name: str) -> str | None:
    """``"hubert"`` for ``hubert`` or ``hubert_local`` (likewise WavLM); None for any other s3prl entry."""
    family = name.removesuffix("_local")
    return family if family in FAMILIES else None


def resolve_upstream(text: str, cache: Path, write: bool = True, option: str = "--upstream") -> UpstreamSpec:
    """The s3prl entry and checkpoint that load ``text`` (``NAME[:CKPT]``); see the module doc.

    ``write=False`` checks without writing the converted copy (every rank of a run checks; one writes).
    """
    name, _, ckpt = text.partition(":")
    family = family_of(name)
    if family is None or "://" in ckpt:
        return UpstreamSpec.parse(text)
    return resolve_base(family, ckpt or None, cache, write, option, f"{option} {text}")


def resolve_base(
    family: str, ckpt: str | None, cache: Path, write: bool = True, option: str = "--ckpt", where: str = ""
) -> UpstreamSpec:
    """The s3prl entry and checkpoint that load base ``ckpt`` of ``family`` (a ``--ckpt`` value or None);
    errors name ``option`` (a folder or file) or ``where`` (what was read)."""
    from s3prl_laser.errors import MissingFileError
    from s3prl_laser.models.sources import S3PRL_NAMES, check_source, hub_folder, is_hub_id, read_source

    where = where or f"{option} {ckpt}"
    if ckpt is None:
        ckpt = f"{family}_base"
    if ckpt in S3PRL_NAMES:
        _read(family, ckpt, where, read_source)  # found in s3prl's download cache, or downloaded; checked
        return UpstreamSpec(ckpt, None)
    if is_hub_id(ckpt):
        source = hub_folder(ckpt)  # downloaded, or found in the hub's cache; UserInputError if neither
    else:
        source = Path(ckpt).expanduser().absolute()
        if not source.exists():
            raise MissingFileError(
                f"{where}: no such file or folder {source} (a checkpoint file, a transformers model folder, "
                "a Hugging Face hub id or one of s3prl's names)"
            )
        check_source(str(source), option)  # a folder is named as a folder; a file must look like a checkpoint
    if source.is_file() and _is_s3prl_format(family, source):
        return UpstreamSpec(f"{family}_local", str(source))
    copy = cache / "bases" / f"{family}-{content_sha256(source)[:20]}.pt"
    if copy.is_file():
        return UpstreamSpec(f"{family}_local", str(copy))
    state = _read(family, str(source), where, read_source)
    if write:
        from s3prl_laser.models.s3prl_format import save_s3prl_checkpoint

        save_s3prl_checkpoint(state, copy)
        logger.info("%s: converted to s3prl's format in %s", where, copy)
    return UpstreamSpec(f"{family}_local", str(copy))


def _read(family: str, ckpt: str, where: str, read_source) -> dict:
    """The s3prl-format dict of ``ckpt`` with only the keys s3prl's ``FAMILY_local`` reads."""
    from s3prl_laser.models.fairseq_import import convert_fairseq_hubert, is_fairseq_checkpoint
    from s3prl_laser.models.s3prl_format import CKPT_KEYS, check_keys

    try:
        state = read_source(family, ckpt)
        if is_fairseq_checkpoint(state):
            if family != "hubert":
                raise UserInputError(f"{ckpt} is a fairseq checkpoint; only HuBERT is read in that format")
            state = convert_fairseq_hubert(state, ckpt)
        check_keys(family, state, ckpt)
    except UserInputError as error:
        raise UserInputError(f"{where}: {error}") from None
    return {key: state[key] for key in CKPT_KEYS[family]}


def _is_s3prl_format(family: str, path: Path) -> bool:
    """Whether ``path`` loads with ``torch.load(weights_only=True)`` and has the family's keys (memory-mapped:
    nothing but the index is read)."""
    import torch

    from s3prl_laser.models.s3prl_format import CKPT_KEYS

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - fairseq, damaged or legacy: the reading path says which
        return False
    return isinstance(state, dict) and all(key in state for key in CKPT_KEYS[family])


def content_sha256(source: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes, sorted; subfolders ignored)."""
    digest = hashlib.sha256()
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    for path in files:
        if source.is_dir():
            digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
