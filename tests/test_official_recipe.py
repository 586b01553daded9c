"""The config keys that restore the official recipe's choices, each checked against a property.

- ``grad_accum_steps``: k batches of one pair accumulate the gradient of the mean loss of the k pairs;
- ``fp32_head``: the projection head computes in fp32 under bf16 autocast;
- ``frame_count: round``: ``min(round(L / 320), F)`` frames per clip instead of the CNN's formula;
- ``warmup_from_zero``: the first step's learning rate is 0.
"""

import dataclasses

import pytest
import torch

from s3prl_laser.data import PairBatch, collate_pairs
from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.loop import forward_pairs, pair_loss, train_step
from s3prl_laser.training.parts import LaserModel, build_model, linear_warmup_decay
from s3prl_laser.training.ranks import DistEnv


def pair_batches(count: int, seed: int = 0) -> list[PairBatch]:
    """``count`` one-pair batches of different lengths (noise; the second view a resampled copy)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        clean = torch.randn(3200 + 900 * i, generator=g)
        other = torch.nn.functional.interpolate(clean[None, None], scale_factor=0.9, mode="linear")[0, 0]
        sample = {"a": clean, "b": other, "skip": None, "position": (0, i)}
        batches.append(collate_pairs([sample]))
    return batches


def tiny_parts(ckpt, *overrides):
    cfg = resolve_config("hubert", overrides=["proj_dim=16", "grad_clip=1e9", *overrides])
    cfg = dataclasses.replace(cfg, ckpt=str(ckpt))
    parts = build_model(cfg, DistEnv())
    parts.model.eval()  # no dropout: the reference and the step must see the same function
    return cfg, parts


def test_accumulated_batch_one_steps_give_the_gradient_of_the_mean_loss(tiny_hubert_ckpt):
    cfg, parts = tiny_parts(tiny_hubert_ckpt, "batch_size=1", "grad_accum_steps=4")
    batches = pair_batches(3)
    empty = collate_pairs([{"a": None, "b": None, "skip": "too_short", "position": (0, 3)}])
    params = parts.trainable()

    losses = []
    for batch in batches:
        z, frames = forward_pairs(parts.module, batch, DistEnv(), cfg)
        losses.append(pair_loss(parts.loss_fn, z, frames, batch.num_pairs).loss)
    reference = torch.autograd.grad(torch.stack(losses).mean(), params)

    seen = []  # the gradients the optimizer step receives
    parts.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in params]))
    result = train_step(parts, [batches[0], empty, batches[1], batches[2]], cfg, DistEnv(), None)
    assert result["stepped"] and result["pairs"] == 3
    assert result["loss"] == pytest.approx(float(torch.stack(losses).mean().detach()), rel=1e-5)
    ours = torch.cat([g.reshape(-1) for g in seen[0]])  # the whole gradient, compared by relative error
    ref = torch.cat([g.reshape(-1) for g in reference])
    assert float((ours - ref).norm()) <= 1e-5 * float(ref.norm())
    assert float(ref.norm()) > 0


def test_fp32_head_computes_the_projection_in_fp32_under_bf16_autocast(tiny_hubert_ckpt):
    cfg, parts = tiny_parts(tiny_hubert_ckpt)
    wavs = torch.randn(2, 8000, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([8000, 6000])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, _ = parts.base(wavs, lengths)
        mixed, _ = LaserModel(parts.base, parts.head)(wavs, lengths)
        full, _ = LaserModel(parts.base, parts.head, fp32_head=True)(wavs, lengths)
    with torch.no_grad():
        expected = parts.head(hidden.float())  # outside autocast: fp32 throughout
    assert mixed.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(full, expected, rtol=0, atol=0)
    assert not torch.equal(mixed.float(), expected)


def test_round_frame_count_is_round_of_length_over_the_stride_capped_at_the_batch(tiny_hubert_ckpt):
    _, parts = tiny_parts(tiny_hubert_ckpt)
    lengths = [16000, 8000, 4100, 4000]
    wavs = torch.randn(4, 16000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden, cnn = LaserModel(parts.base, parts.head)(wavs, torch.tensor(lengths))
        _, rounded = LaserModel(parts.base, parts.head, frame_count="round")(wavs, torch.tensor(lengths))
    total = hidden.shape[1]
    assert cnn.tolist() == [(n - 400) // 320 + 1 for n in lengths]  # 400-sample receptive field, stride 320
    assert rounded.tolist() == [min(round(n / 320), total) for n in lengths] == [49, 25, 13, 12]
    with pytest.raises(ValueError, match="frame_count"):
        LaserModel(parts.base, parts.head, frame_count="ceil")


def test_warmup_from_zero_starts_at_learning_rate_zero():
    ours = [linear_warmup_decay(step, 4, 10) for step in range(6)]
    official = [linear_warmup_decay(step, 4, 10, from_zero=True) for step in range(6)]
    assert official[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert ours[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert official[4:] == ours[4:]  # the decay is the same


def test_official_keys_are_config_keys_with_checked_values():
    cfg = resolve_config(
        "hubert",
        overrides=["batch_size=1", "grad_accum_steps=8", "fp32_head=true", "frame_count=round",
                   "warmup_from_zero=true", "precision=fp32"],
    )  # fmt: skip
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.fp32_head, cfg.frame_count) == (1, 8, True, "round")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        resolve_config("hubert", overrides=["grad_accum_steps=0"])
    with pytest.raises(ValueError, match="frame_count"):
        resolve_config("hubert", overrides=["frame_count=floor"])
