"""The probe's head, decoder and targets on synthetic features whose answer is known.

Features that carry each frame's label (one-hot of the aligned symbol plus noise, random durations) must be
read back almost perfectly; pure noise must stay near chance; a seed must reproduce the numbers.
"""

import pytest
import torch

from s3prl_laser.probe.decode import decode_all, edit_counts, error_rate, greedy_decode
from s3prl_laser.probe.head import HeadSettings, normalise_layers, train_head
from s3prl_laser.probe.runner import split_dev_slice
from s3prl_laser.probe.stats import holds_zero, paired_bootstrap
from s3prl_laser.probe.targets import Vocabulary, char_units, phone_units, read_lexicons

VOCAB, LAYERS, DIM, SIGNAL_LAYER = 12, 4, 24, 2
SETTINGS = HeadSettings(steps=800, batch_size=8, lr=5e-2, eval_every=50, patience=3, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster than several fighting over 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_clips(
    n: int, seed: int, signal: bool, strength: float = 8.0
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """``n`` clips ``[L, F, C]``: 3-8 symbols (no immediate repeat) of 2-5 frames each; with ``signal``,
    layer ``SIGNAL_LAYER`` holds the one-hot of each frame's symbol plus noise, every other layer noise."""
    g = torch.Generator().manual_seed(seed)
    feats, targets = [], []
    for _ in range(n):
        symbols = []
        while len(symbols) < int(torch.randint(3, 9, (1,), generator=g)):
            s = int(torch.randint(1, VOCAB, (1,), generator=g))
            if not symbols or s != symbols[-1]:
                symbols.append(s)
        durations = torch.randint(2, 6, (len(symbols),), generator=g)
        frames = torch.repeat_interleave(torch.tensor(symbols), durations)
        x = torch.randn(LAYERS, len(frames), DIM, generator=g)
        if signal:
            x[SIGNAL_LAYER, :, :VOCAB] += strength * torch.nn.functional.one_hot(frames, VOCAB)
        feats.append(x.half())
        targets.append(symbols)
    return feats, targets


def probe_scores(signal: bool, seed: int = 0, steps: int = SETTINGS.steps, strength: float = 8.0):
    """``(edits per evaluation clip, reference lengths, layer weights)`` of a head on synthetic clips."""
    train_x, train_y = synthetic_clips(60, 1, signal, strength)
    dev_x, dev_y = synthetic_clips(8, 2, signal, strength)
    eval_x, eval_y = synthetic_clips(30, 3, signal, strength)
    train_x, dev_x, eval_x = ([normalise_layers(x) for x in xs] for xs in (train_x, dev_x, eval_x))
    settings = HeadSettings(**{**SETTINGS.__dict__, "seed": seed, "steps": steps})
    head, _ = train_head(train_x, train_y, dev_x, dev_y, VOCAB, settings)
    hypotheses = decode_all(head, eval_x, 8, torch.device("cpu"))
    return edit_counts(eval_y, hypotheses), [len(y) for y in eval_y], head.layer_weights()


def probe_cer(signal: bool, seed: int = 0, steps: int = SETTINGS.steps) -> tuple[float, torch.Tensor]:
    edits, lengths, weights = probe_scores(signal, seed, steps)
    return sum(edits) / sum(lengths), weights


def test_label_carrying_features_are_read_back():
    cer, weights = probe_cer(signal=True)
    assert cer < 0.05
    assert int(weights.argmax()) == SIGNAL_LAYER  # the softmax weights found the layer with the labels
    assert weights.sum().item() == pytest.approx(1.0)


def test_pure_noise_stays_near_chance():
    cer, _ = probe_cer(signal=False)
    assert cer > 0.7


def test_same_seed_same_numbers_other_seed_other_head():
    cer_a, weights_a = probe_cer(signal=True, seed=5, steps=100)
    cer_b, weights_b = probe_cer(signal=True, seed=5, steps=100)
    _, weights_c = probe_cer(signal=True, seed=6, steps=100)
    assert cer_a == cer_b and torch.equal(weights_a, weights_b)
    assert not torch.equal(weights_a, weights_c)


def test_greedy_decode_and_error_rate_against_hand_made_cases():
    frames = torch.tensor([1, 1, 0, 1, 2, 2, 0, 0, 3])
    log_probs = torch.nn.functional.one_hot(frames, 4).float().log()
    assert greedy_decode(log_probs) == [1, 1, 2, 3]  # a blank separates the repeated 1
    assert error_rate([[1, 2, 3, 4]], [[1, 3, 4, 5]]) == 0.5  # one deletion, one insertion
    assert error_rate([[1, 2], [3]], [[1, 2], [3]]) == 0.0
    # pooled over the corpus: 1 edit in 10 symbols and 2 in 2 are 3 / 12, not the mean of 0.1 and 1.0
    long, short = list(range(1, 11)), [1, 2]
    assert edit_counts([long, short], [long[:-1], []]) == [1, 2]
    assert error_rate([long, short], [long[:-1], []]) == pytest.approx(3 / 12)


def test_identical_upstreams_give_an_interval_holding_zero():
    edits, lengths, _ = probe_scores(signal=True, steps=100)
    assert sum(edits) > 0  # a head with errors, so that the relative difference is defined
    interval = paired_bootstrap(edits, list(edits), lengths)
    assert interval == (0.0, 0.0) and holds_zero(interval)


def test_a_real_gap_gives_an_interval_excluding_zero_and_a_small_one_does_not():
    """A strong signal against a weak one: a real gap, seen through the heads; then made-up errors whose
    relative difference is known (about -50 %) and differences too small for 30 utterances."""
    strong, lengths, _ = probe_scores(signal=True, steps=300)
    weak, weak_lengths, _ = probe_scores(signal=True, steps=300, strength=1.5)
    assert lengths == weak_lengths and sum(weak) > 2 * sum(strong)
    low, high = paired_bootstrap(weak, strong, lengths)
    assert high < 0 and not holds_zero((low, high))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 200, (200,), generator=g)
    base = torch.binomial(lengths.float(), torch.full((200,), 0.3), generator=g).long()
    better = base // 2  # half the errors on every utterance
    low, high = paired_bootstrap(base.tolist(), better.tolist(), lengths.tolist())
    known = (int(better.sum()) - int(base.sum())) / int(base.sum())  # about -50 %
    assert low <= known <= high < -0.4
    jitter = base + torch.tensor([1, -1] * 100)[torch.randperm(200, generator=g)]  # other errors, same total
    assert holds_zero(paired_bootstrap(base.tolist(), jitter.tolist(), lengths.tolist()))


def test_character_and_phone_targets(tmp_path):
    vocab = Vocabulary.characters()
    assert char_units("IT'S OK") == ["I", "T", "'", "S", "|", "O", "K"]
    assert vocab.symbols[0] == "<blank>" and len(vocab) == 29
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("IT\tIH1 T\nIS\tIH1 Z\nIT\tAY T\n")
    phones = phone_units(["IT IS"], read_lexicons([lexicon]), str(lexicon))
    assert phones == [["IH1", "T", "IH1", "Z"]]  # the first entry of a word wins, stress marks kept
    assert Vocabulary.of(phones).encode(phones[0]) == [1, 2, 1, 3]


def test_dev_slice_is_a_seeded_tenth():
    fit, stop = split_dev_slice(40, seed=0)
    assert len(stop) == 4 and sorted(fit + stop) == list(range(40))
    assert split_dev_slice(40, seed=0) == (fit, stop) and split_dev_slice(40, seed=1) != (fit, stop)


def test_layer_norm_makes_the_verdict_blind_to_a_layer_s_scale():
    """The default (each layer normalised) is the reliable one: the same content with one noise layer 30 times
    louder (real upstreams' layers differ in scale by that much) gets the same CER with layer norm, and a
    very different one without it (the scale of a layer without content changes the optimisation)."""

    def cer(layer_norm: bool, loud: bool) -> float:
        sets = [synthetic_clips(n, seed, signal=True) for n, seed in ((60, 1), (8, 2), (30, 3))]
        scale = torch.ones(LAYERS, 1, 1)
        scale[0] = 30.0 if loud else 1.0  # layer 0 carries no labels
        prepared = []
        for feats, targets in sets:
            feats = [(x.float() * scale).half() for x in feats]
            prepared.append(([normalise_layers(x) if layer_norm else x for x in feats], targets))
        (train_x, train_y), (dev_x, dev_y), (eval_x, eval_y) = prepared
        settings = HeadSettings(**{**SETTINGS.__dict__, "steps": 300})
        head, _ = train_head(train_x, train_y, dev_x, dev_y, VOCAB, settings)
        return error_rate(eval_y, decode_all(head, eval_x, 8, torch.device("cpu")))

    quiet, loud = cer(True, False), cer(True, True)
    assert abs(quiet - loud) < 0.02 and quiet < 0.1
    assert abs(cer(False, True) - cer(False, False)) > 0.1  # 0.21 vs 0.02 when written: the scale decides
