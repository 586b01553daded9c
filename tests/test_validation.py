"""Held-out diagnostics (s3prl_laser.training.heldout): which clips validate, and the metrics against plain
loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from s3prl_laser.data import AudioItem, find_audio
from s3prl_laser.training.config import resolve_config
from s3prl_laser.training.heldout import eval_mode, far_frame_distance, measure, split_held_out


def brute_sdtw(x, y, gamma):
    """Soft-DTW R[n, m] of x [n, D], y [m, D] by the recursion, in float64 Python floats."""
    n, m = len(x), len(y)
    R = [[math.inf] * (m + 1) for _ in range(n + 1)]
    R[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = [R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]]
            low = min(prev)
            soft = low - gamma * math.log(sum(math.exp(-(p - low) / gamma) for p in prev))
            R[i][j] = float(((x[i - 1] - y[j - 1]) ** 2).sum()) + soft
    return R[n][m]


def brute_divergence(x, y, gamma):
    x, y = x.double(), y.double()
    return brute_sdtw(x, y, gamma) - 0.5 * (brute_sdtw(x, x, gamma) + brute_sdtw(y, y, gamma))


def test_far_frame_distance_is_the_mean_over_pairs_half_a_clip_apart():
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    far = [float((z[i] - z[j]).norm()) for i in range(7) for j in range(7) if abs(i - j) >= 3]
    assert far_frame_distance(z) == pytest.approx(sum(far) / len(far), rel=1e-5)


def test_measure_matches_brute_force_metrics(tiny_hubert_ckpt):
    from s3prl_laser.models.upstream import load_base_model
    from s3prl_laser.training.parts import seeded_head

    cfg = resolve_config("hubert", overrides=["proj_dim=8"])
    base = load_base_model("hubert", tiny_hubert_ckpt)
    head = seeded_head(cfg, base.hidden_size)
    g = torch.Generator().manual_seed(1)
    pairs = [(f"clip{i}", torch.randn(4000 + 800 * i, generator=g), torch.randn(4400 + 640 * i, generator=g))
             for i in range(3)]  # fmt: skip
    with eval_mode(base, head):
        ours = measure(base, head, pairs, gamma=0.1)
        views = []
        with torch.no_grad():
            for _, clean, perturbed in pairs:
                pair = []
                for wav in (clean, perturbed):
                    hidden, frames = base(wav[None], torch.tensor([wav.shape[0]]))
                    hidden = hidden[0, : int(frames[0])]
                    pair.append((F.normalize(hidden, dim=-1), head(hidden)))
                views.append(pair)
    same = {"u": 0.0, "z": 0.0}
    other = {"u": 0.0, "z": 0.0}
    far = {"u": 0.0, "z": 0.0}
    for i, ((u1, z1), (u2, z2)) in enumerate(views):
        u3, z3 = views[(i + 1) % 3][1]
        for key, a, b, c in (("u", u1, u2, u3), ("z", z1, z2, z3)):
            same[key] += brute_divergence(a, b, 0.1)
            other[key] += brute_divergence(a, c, 0.1)
            far[key] += (far_frame_distance(a.double()) + far_frame_distance(b.double())) / 2
    expected = {
        "divergence_projection": same["z"] / 3,
        "divergence_other_projection": other["z"] / 3,
        "divergence_ratio_projection": same["z"] / other["z"],
        "divergence_ratio_upstream": same["u"] / other["u"],
        "far_distance_projection": far["z"] / 3,
        "far_distance_upstream": far["u"] / 3,
    }
    assert ours == pytest.approx(expected, rel=2e-4)


def test_validation_uses_dev_clean_of_a_librispeech_root(demo_corpus):
    cfg = resolve_config("hubert", overrides=[f"data={demo_corpus}", "eval_clips=4"])
    items = find_audio(demo_corpus, ["train-clean-100"])
    held_out, train_items, where = split_held_out(cfg, items)
    assert train_items == items and "dev-clean" in where
    assert len(held_out) == 4 and all("/dev-clean/" in item.path for item in held_out)
    assert split_held_out(cfg, items)[0] == held_out  # seeded: the same clips every time
    other_seed = resolve_config("hubert", overrides=[f"data={demo_corpus}", "eval_clips=4", "seed=1"])
    assert split_held_out(other_seed, items)[0] != held_out


def test_validation_without_dev_clean_holds_out_a_seeded_share_that_training_leaves_out(demo_corpus):
    folder = demo_corpus / "train-clean-100"  # a plain folder of audio: no LibriSpeech split beside it
    cfg = resolve_config("hubert", overrides=[f"data={folder}", "eval_clips=32"])
    items = find_audio(folder)
    held_out, train_items, _ = split_held_out(cfg, items)
    assert len(items) == 40 and len(held_out) == 4  # at most 10 % of the clips
    assert not {i.path for i in held_out} & {i.path for i in train_items}
    assert sorted(held_out + train_items, key=lambda item: item.path) == items
    assert split_held_out(cfg, items)[0] == held_out

    few = [AudioItem(f"/clips/{i}.wav", 16000) for i in range(19)]
    held_out, train_items, where = split_held_out(cfg, few)
    assert held_out == [] and train_items == few and where.startswith("off")
    off = resolve_config("hubert", overrides=[f"data={folder}", "eval_every=0"])
    assert split_held_out(off, items)[:2] == ([], items)
