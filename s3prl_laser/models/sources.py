"""What ``--ckpt`` may name, and how each kind becomes an s3prl-format checkpoint dict.

- a checkpoint file: s3prl's HuBERT "converted" / WavLM format, or an original fairseq HuBERT checkpoint
  (:func:`s3prl_laser.models.s3prl_format.read_checkpoint`), converted in memory by
  :func:`s3prl_laser.models.fairseq_import.convert_fairseq_hubert`;
- a transformers model folder (``config.json`` + weights + ``preprocessor_config.json``), converted in
  memory by :mod:`s3prl_laser.models.hf_import`;
- a Hugging Face hub id (``microsoft/wavlm-large``): the folder is downloaded with
  ``huggingface_hub.snapshot_download`` (or found in its cache), then read like a folder;
- one of s3prl's own names (:data:`S3PRL_NAMES`: ``wavlm_base_plus``, ``hubert_large_ll60k``, ...),
  downloaded by s3prl's helper from the address s3prl's hub entry uses;
- nothing: s3prl's default ``hubert_base`` / ``wavlm_base`` / ``wav2vec2_base_960`` / ``data2vec_base_960``.

:func:`model_size` tells a base-size model from a large one (24 layers, 1024 dims) without building it; the
configuration picks the size's preset from it (:func:`s3prl_laser.training.config.resolve_config`).

Example:
    >>> state = read_source("wavlm", "hf/wavlm-base-plus")  # doctest: +SKIP
    >>> model_size("hubert", "hubert_large_ll60k")
    'large'
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from s3prl_laser.errors import MissingFileError, UserInputError
from s3prl_laser.models import wav2vec2
from s3prl_laser.models.fairseq_import import convert_fairseq_hubert, is_fairseq_checkpoint
from s3prl_laser.models.hf_import import WEIGHT_FILES, hf_folder_to_s3prl, is_hf_folder, read_json
from s3prl_laser.models.s3prl_format import DEFAULT_CKPT_URLS, check_checkpoint_file, read_checkpoint

_CONVERTED = "https://huggingface.co/s3prl/converted_ckpts/resolve/main/"
# s3prl hub name -> (family, size, address its entry downloads; s3prl/upstream/{hubert,wavlm}/hubconf.py)
S3PRL_NAMES = {
    "hubert_base": ("hubert", "base", DEFAULT_CKPT_URLS["hubert"]),
    "hubert_large_ll60k": ("hubert", "large", _CONVERTED + "hubert_large_ll60k.pt"),
    "wavlm_base": ("wavlm", "base", DEFAULT_CKPT_URLS["wavlm"]),
    "wavlm_base_plus": ("wavlm", "base", _CONVERTED + "wavlm_base_plus.pt"),
    "wavlm_large": ("wavlm", "large", _CONVERTED + "wavlm_large.pt"),
    # s3prl/upstream/wav2vec2/hubconf.py and data2vec/hubconf.py (their non-legacy, converted addresses)
    "wav2vec2_base_960": ("wav2vec2", "base", DEFAULT_CKPT_URLS["wav2vec2"]),
    "wav2vec2_large_960": ("wav2vec2", "large", _CONVERTED + "libri960_big.pt"),
    "wav2vec2_large_ll60k": ("wav2vec2", "large", _CONVERTED + "wav2vec_vox_new.pt"),
    "wav2vec2_large_lv60_cv_swbd_fsh": ("wav2vec2", "large", _CONVERTED + "w2v_large_lv_fsh_swbd_cv.pt"),
    "wav2vec2_large_voxpopuli_100k": ("wav2vec2", "large", _CONVERTED + "wav2vec2_large_100k.pt"),
    "xlsr_53": ("wav2vec2", "large", _CONVERTED + "xlsr_53_56k.pt"),
    "xls_r_300m": ("wav2vec2", "large", _CONVERTED + "xlsr2_300m.pt"),
    "xls_r_1b": ("wav2vec2", "large", _CONVERTED + "xlsr2_960m_1000k.pt"),
    "xls_r_2b": ("wav2vec2", "large", _CONVERTED + "xlsr2_2B_1000k.pt"),
    "data2vec_base_960": ("data2vec", "base", DEFAULT_CKPT_URLS["data2vec"]),
    "data2vec_large_ll60k": ("data2vec", "large", _CONVERTED + "vox_pretrained.pt"),
}
SIZES = ("base", "large")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json", ".yaml")


def is_named_source(ckpt: str) -> bool:
    """Whether ``ckpt`` names a download (s3prl name, hub id or URL) rather than a local path."""
    if "://" in ckpt or ckpt in S3PRL_NAMES:
        return True
    return is_hub_id(ckpt)


def is_hub_id(ckpt: str) -> bool:
    """``owner/name`` that is no local path and does not look like a checkpoint file's name."""
    return (
        bool(_HUB_ID.fullmatch(ckpt))
        and not ckpt.endswith(_CHECKPOINT_SUFFIXES)
        and not Path(ckpt).expanduser().exists()
    )


def check_source(ckpt: str, option: str = "--ckpt") -> None:
    """Cheap check before expensive work: a folder must hold ``config.json``, a file must look like a
    checkpoint (:func:`~s3prl_laser.models.s3prl_format.check_checkpoint_file`); names are checked on use."""
    path = Path(ckpt).expanduser()
    if is_named_source(ckpt):
        return
    if path.is_dir():
        if not is_hf_folder(path):
            raise MissingFileError(
                f"{option} {path} is a folder without config.json; pass a checkpoint file or a transformers "
                "model folder (config.json, model.safetensors, preprocessor_config.json)"
            )
        return
    check_checkpoint_file(path, option)


def read_source(upstream: str, ckpt: str | os.PathLike | None) -> dict:
    """The s3prl-format checkpoint dict of ``ckpt`` (see the module doc for what it may name).

    A transformers folder or hub id gives the dict of :func:`s3prl_laser.models.hf_import.hf_folder_to_s3prl`
    (with its ``hf_origin``), an original fairseq file that of
    :func:`from_fairseq`; a download that fails raises
    ``UserInputError`` saying what to pass instead.
    """
    if ckpt is None:
        url = DEFAULT_CKPT_URLS[upstream]
        return read_checkpoint(_s3prl_download(next(n for n, v in S3PRL_NAMES.items() if v[2] == url), url))
    ckpt = str(ckpt)
    if ckpt in S3PRL_NAMES:
        family, _, url = S3PRL_NAMES[ckpt]
        if family != upstream:
            raise UserInputError(f"--ckpt {ckpt} is a {family} model; pass --upstream {family}")
        return from_fairseq(upstream, read_checkpoint(_s3prl_download(ckpt, url)), ckpt)
    if is_hub_id(ckpt):
        return hf_folder_to_s3prl(hub_folder(ckpt), upstream)
    if Path(ckpt).expanduser().is_dir():
        return hf_folder_to_s3prl(ckpt, upstream)
    return from_fairseq(upstream, read_checkpoint(ckpt), ckpt)


def from_fairseq(upstream: str, state: dict, where: str) -> dict:
    """``state`` in s3prl's format: an original fairseq HuBERT, wav2vec 2.0 or data2vec checkpoint converted,
    anything else as is."""
    if not is_fairseq_checkpoint(state):
        return state
    if upstream in wav2vec2.FAMILIES:
        return wav2vec2.convert_fairseq(upstream, state, where)
    if upstream != "hubert":
        raise UserInputError(f"{where} is a fairseq checkpoint; WavLM is not read in that format")
    return convert_fairseq_hubert(state, where)


def hub_folder(repo_id: str) -> Path:
    """Download (or find in the cache) the model folder of hub id ``repo_id`` with huggingface_hub."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "preprocessor_config.json", *WEIGHT_FILES, "model-*.safetensors",
                "pytorch_model-*.bin"]  # fmt: skip
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError) as error:  # offline, no such repository, network, invalid id
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set" if offline else str(error).strip().splitlines()[0]
        raise UserInputError(
            f"--ckpt {repo_id}: no such local file or folder, and the Hugging Face hub id cannot be "
            f"downloaded ({reason}); download the model folder elsewhere and pass it as --ckpt FOLDER"
        ) from None


def _s3prl_download(name: str, url: str) -> str:
    from s3prl.util import download

    try:
        return download._urls_to_filepaths(url)
    except OSError as error:  # no network, proxy, HTTP error (requests' errors are OSErrors)
        raise UserInputError(
            f"cannot download s3prl's {name} checkpoint from {url} ({error}); download it yourself and "
            "pass it with --ckpt FILE"
        ) from None


def model_size(upstream: str, ckpt: str | os.PathLike | None) -> str:
    """``"large"`` for a model of more than 12 layers or 768 dims (HuBERT/WavLM Large), else ``"base"``.

    Read without building the model: the config of a transformers folder (a hub id's ``config.json`` is
    fetched alone), the table of s3prl names, or the config of a checkpoint file (memory-mapped). Where it
    cannot be read (no network, a damaged file) the answer is ``"base"``; loading the model reports the error.
    """
    if ckpt is None:
        return "base"
    ckpt = str(ckpt)
    if ckpt in S3PRL_NAMES:
        return S3PRL_NAMES[ckpt][1]
    try:
        layers, dim = _layers_and_dim(ckpt)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError):
        return "base"  # e.g. an original fairseq checkpoint (not a weights-only pickle)
    return "large" if layers > 12 or dim > 768 else "base"


def _layers_and_dim(ckpt: str) -> tuple[int, int]:
    if "://" in ckpt:
        raise ValueError("a URL: not read before loading")
    if is_hub_id(ckpt):
        from huggingface_hub import hf_hub_download

        config = read_json(Path(hf_hub_download(ckpt, "config.json")))
        return int(config["num_hidden_layers"]), int(config["hidden_size"])
    path = Path(ckpt).expanduser()
    if path.is_dir():
        config = read_json(path / "config.json")
        return int(config["num_hidden_layers"]), int(config["hidden_size"])
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    cfg = state.get("model_cfg") or state["cfg"]  # HuBERT, wav2vec2, data2vec converted / WavLM
    return int(cfg["encoder_layers"]), int(cfg["encoder_embed_dim"])
