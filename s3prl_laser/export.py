"""Export a LASER-tuned (or any s3prl) HuBERT/WavLM checkpoint as a Hugging Face ``transformers`` model.

Command line::

    python -m s3prl_laser.export --ckpt OUT/hubert_laser.pt --to hf DIR [--upstream hubert] [--verify]

A missing, damaged or unsupported checkpoint, or an output directory that is a file or not empty (without
``--overwrite``), is reported in one line naming it, with exit status 2, before anything is written.

``DIR`` becomes a ``save_pretrained`` directory: ``config.json``, ``model.safetensors`` and
``preprocessor_config.json`` (a ``Wav2Vec2FeatureExtractor``), loadable offline with
``transformers.AutoModel.from_pretrained(DIR)`` and ``AutoFeatureExtractor.from_pretrained(DIR)``.
``--verify`` then runs s3prl's stock expert (``s3prl.hub.hubert_local`` / ``wavlm_local``) and the
exported model on the same random waveforms and checks every hidden state (see :func:`verify_export`).

Layer correspondence: ``hf(...).hidden_states[i]`` is s3prl's ``hidden_states[i]`` for every i, L + 1 of
them for L layers: index 0 is the input of layer 0 (after the positional convolution, and after the
encoder layer norm when ``layer_norm_first=False``), index i the output of layer i - 1, and the last
index the encoder output (after the final encoder layer norm when ``layer_norm_first=True``). The config
sets ``tie_last_hidden_states: true`` for that last index: without it, transformers >= 5 returns the last
layer's output before the final layer norm there (transformers 4 ignores the key and always returns the
encoder output). A model imported from a transformers folder is written back with that folder's own config,
which may lack the key: its ``last_hidden_state`` is then the encoder output, and ``--verify`` compares the
last index with it.

Checked numerically (``tests/test_export.py``, float32, CPU): on the same waveforms every hidden state
equals the expert's within 1e-5 (``torch.testing.assert_close`` rtol = atol = 1e-5; measured: at most 3e-6),
for HuBERT and WavLM, post-LN + group-norm CNN and pre-LN + layer-norm CNN, one waveform at a time and
as a zero-padded batch with ``attention_mask`` (valid frames). Padding: transformers marks a frame valid
when the CNN output length of the waveform covers it, s3prl when any sample of its ``N // T`` chunk is
real; the two can differ by one frame at some lengths. Group-norm CNNs (``feat_extract_norm="group"``)
normalise over the padding too, so their batched outputs depend on the padding in both libraries; that is
why their feature extractor returns no attention mask, as transformers does for such models.

Example::

    >>> from s3prl_laser.export import export_to_hf
    >>> export_to_hf("runs/demo/hubert_laser.pt", "hf/hubert_laser")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from s3prl_laser.names import UPSTREAMS
from s3prl_laser.stacks import require_python, stack_problem

if TYPE_CHECKING:  # torch, transformers and s3prl are imported where used: not before --help
    import torch


VERIFY_SECONDS = (1.0, 1.37)  # lengths of the verification waveforms (an odd one included)
VERIFY_TOLERANCE = 1e-5  # largest ||hf - s3prl|| / ||s3prl|| accepted by --verify (<= 4e-7 measured, CPU)


def export_to_hf(ckpt: str | Path, out_dir: str | Path, upstream: str | None = None) -> list[str]:
    """Convert ``ckpt`` and write model, config and feature extractor into ``out_dir``.

    Args:
        ckpt: s3prl HuBERT "converted" or WavLM checkpoint (format detected from its keys).
        out_dir: target directory (created; existing files of the same names are replaced).
        upstream: ``"hubert"``/``"wavlm"`` to insist on a format.

    Returns:
        the s3prl keys that were not exported (HuBERT's ``final_proj``/``label_embs_concat``).
    """
    from s3prl_laser.models.hf_export import feature_extractor, load_s3prl_checkpoint, to_hf_model
    from s3prl_laser.models.hf_import import quiet_loading

    state = load_s3prl_checkpoint(ckpt, upstream)
    model = to_hf_model(state)
    out_dir = Path(out_dir)
    before = _files(out_dir)
    with quiet_loading():
        model.save_pretrained(out_dir, safe_serialization=True)
        feature_extractor(state, model.config).save_pretrained(out_dir)
    honour_umask([path for path, key in _files(out_dir).items() if before.get(path) != key])
    return model.s3prl_dropped_keys


def _files(folder: Path) -> dict[Path, tuple[int, int, int]]:
    """The files in ``folder`` with what tells a rewritten one: inode, size, modification time."""
    if not folder.is_dir():
        return {}
    return {p: (s.st_ino, s.st_size, s.st_mtime_ns) for p in folder.iterdir() if p.is_file()
            for s in [p.stat()]}  # fmt: skip


def honour_umask(paths: list[Path]) -> None:
    """Give ``paths`` the permissions a plain ``open()`` would (``0o666`` less the umask): some writers
    (transformers' ``save_pretrained``) leave ``0o600`` files, which a group-shared folder cannot use."""
    from s3prl_laser.models.s3prl_format import current_umask

    mode = 0o666 & ~current_umask()
    for path in paths:
        os.chmod(path, mode)


def verify_waveforms(seconds=VERIFY_SECONDS, sample_rate: int = 16000, seed: int = 0) -> list[torch.Tensor]:
    """Seeded test waveforms ``[T_i]``: a chirp plus noise, peak about 0.5, one per entry of ``seconds``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    wavs = []
    for sec in seconds:
        t = torch.arange(int(sec * sample_rate)) / sample_rate
        chirp = torch.sin(2 * math.pi * (100 + 400 * t) * t)
        wavs.append(0.4 * chirp + 0.1 * torch.randn(t.shape, generator=gen))
    return wavs


def s3prl_expert(ckpt: str | Path, upstream: str) -> torch.nn.Module:
    """s3prl's stock expert ``s3prl.hub.<upstream>_local(ckpt=...)`` in eval mode."""
    import s3prl.hub

    return getattr(s3prl.hub, f"{upstream}_local")(ckpt=str(ckpt)).eval()


def verify_export(ckpt: str | Path, hf_dir: str | Path, upstream: str | None = None) -> list[float]:
    """Relative error ``||hf - s3prl|| / ||s3prl||`` per hidden state, exported model vs s3prl's expert.

    Each waveform of :func:`verify_waveforms` runs on its own (batch of one, no padding) through
    ``s3prl.hub.<upstream>_local(ckpt=...)`` and through ``AutoModel.from_pretrained(hf_dir)``, both in
    eval mode. The exported model gets the waveform as s3prl's model sees it: layer-normalised
    (``F.layer_norm``, eps 1e-5) when the checkpoint's ``normalize`` flag is set. (The saved feature
    extractor's ``do_normalize`` uses eps 1e-7: a relative difference of about 5e-6 / variance.) The last
    index is compared with ``last_hidden_state``, the encoder output whatever ``tie_last_hidden_states`` says.

    Returns:
        one float per hidden state (L + 1), the maximum over the waveforms.
    """
    import torch
    import torch.nn.functional as F

    from s3prl_laser.models.hf_export import hf_model, load_s3prl_checkpoint

    state = load_s3prl_checkpoint(ckpt, upstream)
    expert, model = s3prl_expert(ckpt, state.upstream), hf_model(hf_dir)  # loaded once, run per waveform
    worst: list[float] = []
    for wav in verify_waveforms(sample_rate=state.sample_rate):
        with torch.no_grad():
            ref = list(expert([wav])["hidden_states"])  # [1, T, D] each, L + 1 of them
            input_values = F.layer_norm(wav, wav.shape) if state.normalize else wav
            result = model(input_values[None], output_hidden_states=True)
            out = [*result.hidden_states[:-1], result.last_hidden_state]
        if len(ref) != len(out):
            raise ValueError(f"{hf_dir}: {len(out)} hidden states, s3prl's expert gives {len(ref)}")
        errors = [((o - r).norm() / r.norm()).item() for r, o in zip(ref, out, strict=True)]
        worst = [max(a, b) for a, b in zip(worst, errors, strict=True)] if worst else errors
    return worst


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s3prl_laser.export",
        description="Export an s3prl HuBERT/WavLM checkpoint (e.g. OUT/hubert_laser.pt) to transformers.",
    )
    parser.add_argument("--ckpt", type=Path, required=True, help="s3prl HuBERT/WavLM checkpoint")
    parser.add_argument("--to", choices=["hf"], required=True, help="export format (hf: transformers)")
    parser.add_argument("out_dir", type=Path, help="output directory (save_pretrained layout)")
    parser.add_argument("--upstream", choices=UPSTREAMS, help="checkpoint format; default: detect from keys")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty output directory")
    parser.add_argument(
        "--verify",
        action="store_true",
        help=f"compare every hidden state with s3prl's expert; fail above {VERIFY_TOLERANCE:g}",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    require_python("python -m s3prl_laser.export")
    args = get_args_parser().parse_args(argv)
    if (problem := stack_problem()) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from s3prl_laser.console import quiet_transformers, setup_console
    from s3prl_laser.errors import UserInputError
    from s3prl_laser.models.s3prl_format import check_checkpoint_file
    from s3prl_laser.training.paths import check_output_folder

    setup_console(logging.INFO, fmt="%(levelname)s %(name)s: %(message)s")  # other libraries' chatter: DEBUG
    quiet_transformers()
    try:
        check_checkpoint_file(args.ckpt, "--ckpt")
        check_output_folder(args.out_dir, "output directory")
        if args.out_dir.is_dir() and any(args.out_dir.iterdir()) and not args.overwrite:
            raise UserInputError(
                f"output directory {args.out_dir} is not empty; pass --overwrite to replace its files"
            )
        dropped = export_to_hf(args.ckpt, args.out_dir, args.upstream)
    except UserInputError as error:  # the checkpoint or the output directory: one line, exit 2
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} -> {args.out_dir}")
    if dropped:
        print(f"not exported (pre-training heads, not part of the transformers model): {', '.join(dropped)}")
    if args.verify:
        errors = verify_export(args.ckpt, args.out_dir, args.upstream)
        for i, err in enumerate(errors):
            print(f"hidden_states[{i}]: ||hf - s3prl|| / ||s3prl|| = {err:.3g}")
        if max(errors) > VERIFY_TOLERANCE:
            print(f"FAILED: difference above {VERIFY_TOLERANCE:g}")
            return 1
        print(f"verified: all {len(errors)} hidden states within {VERIFY_TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
