"""Data: finding audio, reading/cropping/perturbing pairs, skip accounting, the bucketing sampler."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from s3prl_laser.data import (
    AudioItem,
    BucketBatchSampler,
    PairDataset,
    clip_limit_samples,
    collate_pairs,
    complete_pairs,
    describe_splits,
    find_audio,
    measure_lengths,
    random_crop,
    read_audio,
    refuse_held_out,
    split_of,
)
from s3prl_laser.objective.perturb import LaserPerturbation


def write_wav(path: Path, samples: int, rate: int = 16000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    soundfile.write(path, (0.1 * rng.standard_normal(samples)).astype("float32"), rate)
    return path


def test_librispeech_root_uses_the_requested_splits(demo_corpus):
    train = find_audio(demo_corpus, ["train-clean-100"])
    held_out = find_audio(demo_corpus, ["dev-clean", "test-clean"])
    on_disk = sorted(str(p) for p in (demo_corpus / "train-clean-100").rglob("*.flac"))
    assert [item.path for item in train] == on_disk
    assert not {item.path for item in train} & {item.path for item in held_out}
    assert all("/dev-clean/" in i.path or "/test-clean/" in i.path for i in held_out)
    with pytest.raises(ValueError, match="train-other-500"):
        find_audio(demo_corpus, ["train-other-500"])


def test_parent_of_librispeech_uses_only_the_requested_splits(demo_corpus):
    """torchaudio's layout: --data /data with /data/LibriSpeech/train-clean-100 trains on that split only."""
    on_disk = sorted(str(p) for p in (demo_corpus / "train-clean-100").rglob("*.flac"))
    everything = sorted(str(p) for p in demo_corpus.parent.rglob("*.flac"))
    assert len(everything) > len(on_disk)  # the parent also holds dev-clean and test-clean
    assert [item.path for item in find_audio(demo_corpus.parent, ["train-clean-100"])] == on_disk
    refuse_held_out(find_audio(demo_corpus.parent), demo_corpus.parent)  # nothing held out: no error


def copy_split(demo_corpus, split, target):
    """A real copy of a split's audio under ``target/<split>/`` (a plain folder, not a LibriSpeech root)."""
    files = sorted((demo_corpus / split).rglob("*.flac"))
    for path in files:
        copy = target / path.relative_to(demo_corpus)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    return sorted(str(target / p.relative_to(demo_corpus)) for p in files)


def test_held_out_audio_is_refused_through_a_folder_and_a_manifest(demo_corpus, tmp_path):
    folder = tmp_path / "my_audio"
    write_wav(folder / "mine" / "a.wav", 1600)
    held_out = copy_split(demo_corpus, "test-clean", folder / "LS")
    items = find_audio(folder)  # a plain folder: no split folder at its top, so every file is listed
    assert len(items) == 1 + len(held_out)
    with pytest.raises(ValueError, match="allow_held_out_splits") as error:
        refuse_held_out(items, folder)
    assert held_out[0] in str(error.value) and f"{len(held_out)} of {len(items)}" in str(error.value)

    manifest = tmp_path / "list.txt"
    train = sorted((demo_corpus / "train-clean-100").rglob("*.flac"))[:3]
    dev = sorted((demo_corpus / "dev-clean").rglob("*.flac"))[2]
    manifest.write_text("\n".join(map(str, [*train, dev])) + "\n")
    with pytest.raises(ValueError, match=str(dev)):
        refuse_held_out(find_audio(manifest), manifest)


def test_split_of_names_the_nearest_split_folder():
    assert split_of("/d/LibriSpeech/train-clean-360/1/2/1-2-0001.flac") == "train-clean-360"
    assert split_of("/d/mini/dev-clean-2/1/2/a.flac") == "dev-clean-2"
    assert split_of("/d/test-other/x/train-other-500/a.flac") == "train-other-500"
    assert split_of("/d/testing/dev-set/a.flac") is None
    assert split_of("/d/dev-clean") is None  # a file named like a split is not a folder


def test_split_summary_counts_clips_and_hours(tmp_path):
    items = [AudioItem("/d/train-clean-100/a.flac", 16000 * 1800), AudioItem("/d/train-clean-100/b.flac", 0)]
    items.append(AudioItem("/d/other/c.flac", 16000 * 3600))
    summary = describe_splits(items, 16000)
    assert summary == "no split folder: 1 clips, 1.00 h; train-clean-100: 2 clips, 0.50 h"


def test_folder_tree_and_manifest(tmp_path):
    a = write_wav(tmp_path / "clips" / "x" / "a.wav", 1600)
    b = write_wav(tmp_path / "clips" / "b.flac", 3200)
    (tmp_path / "clips" / "notes.txt").write_text("not audio")
    assert [i.path for i in find_audio(tmp_path / "clips")] == sorted([str(a), str(b)])

    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# clips\nclips/x/a.wav 1600\n\n{b}\n")
    items = find_audio(manifest)
    assert items == sorted([AudioItem(str(tmp_path / "clips/x/a.wav"), 1600), AudioItem(str(b))], key=str)
    measured, dropped = measure_lengths(items)
    assert dropped == 0 and {i.num_samples for i in measured} == {1600, 3200}


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        find_audio(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*no audio"):
        find_audio(tmp_path / "empty")
    (tmp_path / "bad.txt").write_text("clip.mp3\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 1"):
        find_audio(tmp_path / "bad.txt")


def test_unreadable_files_are_dropped_while_measuring(tmp_path):
    good = write_wav(tmp_path / "good.wav", 800)
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"this is not a flac file")
    kept, dropped = measure_lengths([AudioItem(str(bad)), AudioItem(str(good))])
    assert kept == [AudioItem(str(good), 800)] and dropped == 1


def test_lengths_are_counted_at_the_target_rate(tmp_path):
    clip = write_wav(tmp_path / "8k.wav", 4000, rate=8000)
    [item], _ = measure_lengths([AudioItem(str(clip))], sample_rate=16000)
    assert item.num_samples == 8000
    dataset = PairDataset([item], LaserPerturbation([1.0], 0.0), swap_prob=0.0)
    assert dataset[(0, 0, 0)]["a"].shape[-1] == 8000


def make_dataset(tmp_path, lengths, **kwargs):
    items = [AudioItem(str(write_wav(tmp_path / f"{i}.wav", n, seed=i)), n) for i, n in enumerate(lengths)]
    perturb = kwargs.pop("perturb", LaserPerturbation([0.9, 1.0, 1.1], pitch_semitones=2))
    return PairDataset(items, perturb, **kwargs)


def test_pairs_are_deterministic_per_clip_and_epoch(tmp_path):
    dataset = make_dataset(tmp_path, [24000], max_seconds=0.5)
    first, again, other = dataset[(0, 0, 0)], dataset[(0, 0, 5)], dataset[(0, 1, 0)]
    torch.testing.assert_close(first["a"], again["a"])
    torch.testing.assert_close(first["b"], again["b"])
    assert not (first["a"].shape == other["a"].shape and torch.equal(first["a"], other["a"]))


def test_crop_and_speed_ratio(tmp_path):
    dataset = make_dataset(
        tmp_path, [40000], max_seconds=1.0, swap_prob=0.0, perturb=LaserPerturbation([0.8], 0.0)
    )
    wav = torch.from_numpy(soundfile.read(dataset.items[0].path, dtype="float32")[0])
    for epoch in range(4):
        sample = dataset[(0, epoch, 0)]
        clean, perturbed = sample["a"], sample["b"]
        assert clean.shape[-1] == 16000
        starts = [s for s in range(40000 - 16000 + 1) if torch.equal(wav[s : s + 16000], clean)]
        assert len(starts) == 1
        assert perturbed.shape[-1] == math.ceil(16000 / 0.8)


def test_swap_probability_extremes(tmp_path):
    keep = make_dataset(tmp_path, [8000], swap_prob=0.0, perturb=LaserPerturbation([1.1], 0.0))
    swap = make_dataset(tmp_path, [8000], swap_prob=1.0, perturb=LaserPerturbation([1.1], 0.0))
    kept, swapped = keep[(0, 0, 0)], swap[(0, 0, 0)]
    assert kept["a"].shape[-1] == 8000 and kept["b"].shape[-1] == math.ceil(8000 / 1.1)
    torch.testing.assert_close(swapped["a"], kept["b"])
    torch.testing.assert_close(swapped["b"], kept["a"])


def test_half_of_the_pairs_are_swapped(tmp_path):
    dataset = make_dataset(tmp_path, [1600], perturb=LaserPerturbation([1.1], 0.0))
    swapped = sum(dataset[(0, epoch, 0)]["a"].shape[-1] != 1600 for epoch in range(400))
    assert 150 < swapped < 250  # Binomial(400, 0.5): 5 standard deviations either side


def test_short_and_unreadable_clips_are_skipped_and_counted(tmp_path):
    dataset = make_dataset(tmp_path, [399, 4000, 420], perturb=LaserPerturbation([1.2], 0.0))
    bad = tmp_path / "corrupt.flac"
    bad.write_bytes(b"\x00" * 100)
    dataset.items.append(AudioItem(str(bad), 4000))  # length from a manifest: not opened while scanning
    batch = collate_pairs([dataset[(i, 0, 3)] for i in range(4)])
    # 399 samples < 400; 420 samples at speed 1.2 -> 350 < 400; the corrupt file cannot be read.
    assert batch.skipped == {"too_short": 2, "unreadable": 1}
    assert batch.num_pairs == 1 and batch.position == (0, 3)


def test_collate_pads_first_views_then_second_views():
    samples = [
        {"a": torch.ones(5), "b": torch.full((3,), 2.0), "skip": None, "position": (1, 2)},
        {"a": None, "b": None, "skip": "too_short", "position": (1, 2)},
        {"a": torch.full((2,), 3.0), "b": torch.full((6,), 4.0), "skip": None, "position": (1, 2)},
    ]
    batch = collate_pairs(samples)
    assert batch.wavs.shape == (4, 6) and batch.lengths.tolist() == [5, 2, 3, 6]
    assert batch.wavs[1].tolist() == [3, 3, 0, 0, 0, 0] and batch.wavs[2].tolist() == [2, 2, 2, 0, 0, 0]
    empty = collate_pairs([samples[1]])
    assert empty.num_pairs == 0 and empty.skipped == {"too_short": 1}


def test_random_crop_keeps_short_clips():
    wav = torch.arange(10.0)
    assert torch.equal(random_crop(wav, 20, torch.Generator()), wav)
    assert torch.equal(random_crop(wav, None, torch.Generator()), wav)


def epoch_of(sampler, epoch):
    return [[key[0] for key in batch] for batch in sampler.epoch_batches(epoch)]


def test_sampler_covers_every_clip_once_per_epoch_and_buckets_by_length():
    lengths = torch.randint(1000, 100000, (103,), generator=torch.Generator().manual_seed(1)).tolist()
    sampler = BucketBatchSampler(lengths, batch_size=8, bucket_batches=100, seed=3)
    batches = sampler.epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(103))
    # One chunk holds every clip: each batch is a run of consecutive clips in length order.
    order = sorted(range(103), key=lambda i: -lengths[i])
    rank_of = {i: r for r, i in enumerate(order)}
    for batch in batches:
        ranks = sorted(rank_of[i] for i in batch)
        assert ranks == list(range(ranks[0], ranks[0] + len(batch)))
    assert sampler.epoch_batches(1) != batches


def test_sampler_shards_are_disjoint_and_equal_sized():
    lengths = list(range(1000, 1000 + 37))
    shards = [
        BucketBatchSampler(lengths, 4, 2, seed=0, rank=r, world_size=3).epoch_batches(0) for r in range(3)
    ]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 3  # 10 batches -> 3 per rank, 1 dropped
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="processes"):
        BucketBatchSampler(lengths[:4], 4, world_size=2)


def test_sampler_resumes_at_a_position():
    lengths = list(range(500, 530))
    sampler = BucketBatchSampler(lengths, 4, 2, seed=5)
    per_epoch = sampler.batches_per_epoch(0)
    stream = iter(sampler)
    straight = [next(stream) for _ in range(per_epoch + 3)]
    position = (0, 0)
    for _ in range(per_epoch + 1):
        position = sampler.next_position(position)
    assert position == (1, 1)
    resumed = iter(BucketBatchSampler(lengths, 4, 2, seed=5, start=position))
    assert [next(resumed) for _ in range(2)] == straight[per_epoch + 1 :]
    assert all(key[1:3] == (1, n + 1) for n, batch in enumerate(straight[per_epoch + 1 :]) for key in batch)


def padded_cost(batch, lengths, stretch):
    """Samples of the [2B, T] tensor a batch becomes: 2 views x pairs x the longest view."""
    return 2 * len(batch) * math.ceil(max(lengths[i] for i in batch) * stretch)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_small_budget_cuts_batches_into_micro_batches_that_fit_and_keeps_the_batches(world_size):
    lengths = torch.randint(8000, 320000, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    stretch = 1 / 0.8
    budget = 16000 * 40  # 40 s of padded audio: e.g. 4 pairs of 4 s clips (5 s views), 1 pair of 16 s
    limit = clip_limit_samples(None, budget / 16000, [0.8, 1.0], 16000)
    assert limit == 16000 * 16  # 40 s / (2 views x 1.25)
    assert sum(n > limit for n in lengths) > 10  # some clips are cropped to the budget
    cropped = [min(n, limit) for n in lengths]
    for epoch in range(3):
        for rank in range(world_size):
            free = BucketBatchSampler(lengths, 8, 10, seed=1, rank=rank, world_size=world_size)
            bounded = BucketBatchSampler(
                lengths, 8, 10, seed=1, rank=rank, world_size=world_size, max_batch_samples=budget,
                view_stretch=stretch, budget_limit=limit,
            )  # fmt: skip
            # the budget changes no batch: the same pairs in the same order as without it
            assert bounded.epoch_batches(epoch) == free.epoch_batches(epoch)
            batches = free.epoch_batches(epoch)
            assert sum(len(b) == 8 for b in batches) >= len(batches) - math.ceil(300 / 80)  # chunk tails
            splits = 0
            for batch in batches:
                parts = bounded.micro_batches(batch)
                assert [i for part in parts for i in part] == batch  # consecutive, every pair once
                assert all(padded_cost(part, cropped, stretch) <= budget for part in parts)
                # greedy: a micro-batch could not have taken the next pair of its batch
                for part, following in zip(parts, parts[1:], strict=False):
                    assert padded_cost(part + following[:1], cropped, stretch) > budget
                splits += len(parts) > 1
            assert splits > len(batches) // 2  # the budget binds
    # iteration: each batch's micro-batches in order, labelled (part, parts); whole batches without budget
    sampler = BucketBatchSampler(
        lengths, 8, 10, seed=1, max_batch_samples=budget, view_stretch=stretch, budget_limit=limit
    )
    stream = iter(sampler)
    for number, batch in enumerate(sampler.epoch_batches(0)[:20]):
        parts = sampler.micro_batches(batch)
        for part, indices in enumerate(parts):
            assert next(stream) == [(i, 0, number, part, len(parts)) for i in indices]


def test_budgeted_batches_are_deterministic_and_resume_mid_epoch():
    lengths = torch.randint(8000, 160000, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    kwargs = dict(max_batch_samples=16000 * 30, view_stretch=1.25, budget_limit=16000 * 12)
    sampler = BucketBatchSampler(lengths, 8, 5, seed=9, **kwargs)
    stream = iter(sampler)
    straight = list(itertools.takewhile(lambda batch: batch[0][1] < 2, stream))  # epochs 0 and 1
    assert any(batch[0][4] > 1 for batch in straight)  # the budget cut some batches
    again = iter(BucketBatchSampler(lengths, 8, 5, seed=9, **kwargs))
    assert [next(again) for _ in straight] == straight
    position = (0, 0)
    for _ in range(sampler.batches_per_epoch(0) + 3):
        position = sampler.next_position(position)
    assert position == (1, 3)
    resumed = iter(BucketBatchSampler(lengths, 8, 5, seed=9, start=position, **kwargs))
    first = next(n for n, batch in enumerate(straight) if batch[0][1:4] == (1, 3, 0))  # its first part
    tail = straight[first:]
    assert [next(resumed) for _ in tail] == tail


def test_a_clip_longer_than_the_budget_is_cropped_to_it_and_counted(tmp_path):
    dataset = make_dataset(
        tmp_path, [48000, 8000], max_seconds=10.0, budget_limit=16000, perturb=LaserPerturbation([0.8], 0.0),
        swap_prob=0.0,
    )  # fmt: skip
    wav = torch.from_numpy(soundfile.read(dataset.items[0].path, dtype="float32")[0])
    long, short = dataset[(0, 0, 0)], dataset[(1, 0, 0)]
    assert long["cropped"] and not short["cropped"] and long["a"].shape[-1] == 16000
    assert any(torch.equal(wav[s : s + 16000], long["a"]) for s in range(48000 - 16000 + 1))
    assert long["b"].shape[-1] == math.ceil(16000 / 0.8) and short["a"].shape[-1] == 8000
    assert collate_pairs([long, short]).cropped == 1
    by_max_seconds = make_dataset(tmp_path, [48000], max_seconds=0.5, budget_limit=16000)
    assert not by_max_seconds[(0, 0, 0)]["cropped"]  # max_seconds cut it first: not the budget's doing
    with pytest.raises(ValueError, match="max_batch_samples"):
        BucketBatchSampler([48000, 8000], 2, max_batch_samples=64000, view_stretch=1.25)


def test_perturbing_on_the_device_gives_the_workers_pairs(tmp_path):
    lengths = [16000, 12000, 20000, 9000, 15000]
    workers = make_dataset(tmp_path, lengths, max_seconds=1.0)
    device = make_dataset(tmp_path, lengths, max_seconds=1.0, perturb_in_worker=False)
    for epoch in range(3):
        keys = [(i, epoch, 0) for i in range(len(lengths))]
        expected = collate_pairs([workers[key] for key in keys])
        pending = collate_pairs([device[key] for key in keys])
        assert pending.wavs.shape[0] == pending.num_pairs == expected.num_pairs == len(lengths)
        done = complete_pairs(pending, device.perturb, torch.device("cpu"))
        assert done.perturb_params is None and done.lengths.tolist() == expected.lengths.tolist()
        relative = (done.wavs - expected.wavs).norm(dim=1) / expected.wavs.norm(dim=1)
        assert relative.max() < 5e-4  # float32 rounding (batched vs per clip; equal to 1e-16 in float64)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_read_audio_resamples_like_torchaudio(tmp_path, rate):
    torchaudio = pytest.importorskip("torchaudio")  # the reference; our package does not need it
    wav = torch.randn(rate // 3, generator=torch.Generator().manual_seed(rate)).clamp(-1, 1) * 0.5
    path = tmp_path / "clip.wav"
    soundfile.write(path, wav.numpy(), rate, subtype="FLOAT")
    expected = torchaudio.functional.resample(wav, rate, 16000)
    torch.testing.assert_close(read_audio(str(path)), expected, rtol=1e-4, atol=5e-5)  # float32 sums
