"""One optimizer step, tested where a plausible bug would show: unequal micro-batches, out-of-memory errors
in the forward and in the backward with live activations, a non-finite micro-batch, the first AdamW step.

Runs use a plain tiny model (no dropout, per-frame normalised features) on 1 s views (no speed change), so
that a pair's loss does not depend on the batch it is in, and an AdamW with a large ``eps``: its update is
then linear in the gradient, so a gradient off by a factor (a micro-batch weighted wrongly) moves the weights
visibly (see ``test_finetune.py``'s budget test for the reasons)."""

import functools
import weakref

import pytest
import torch

from s3prl_laser.finetune import main
from s3prl_laser.training import checkpoints, loop

FAST = ["max_seconds=1.0", "num_workers=0", "warmup_steps=1", "log_every=1", "eval_every=0"]
PLAIN = ["perturb_on=device", "speed_factors=[1.0]", "lr=30.0", "weight_decay=0.0", "batch_size=4"]


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    from s3prl_laser.fixtures import build_tiny_hubert

    return build_tiny_hubert(
        tmp_path_factory.mktemp("plain") / "plain.pt", seed=0, extractor_mode="layer_norm", dropout=0.0,
        attention_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0, dropout_features=0.0,
    )  # fmt: skip


@pytest.fixture
def linear_adamw(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", functools.partial(torch.optim.AdamW, eps=1e3))


def run(out, ckpt, data, *overrides) -> int:
    argv = ["--upstream", "hubert", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out)]
    return main([*argv, *FAST, *PLAIN, *overrides])


def weights(out):
    return torch.load(out / "hubert_laser.pt", weights_only=True)["model_weight"]


def state(out):
    return checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out))


def assert_same_training(a: dict, b: dict, base: dict) -> None:
    """``b`` trained like ``a``: every weight within 1e-3 of the largest move ``a`` made."""
    moved = {n: a[n] - base[n] for n in a if not torch.equal(a[n], base[n])}
    largest = max(float(d.abs().max()) for d in moved.values())
    assert len(moved) > 10 and largest > 1e-5
    assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-3 * largest


def test_unequal_micro_batches_weigh_each_pair_once(tmp_path, plain_ckpt, demo_corpus, linear_adamw):
    """A budget of 3 pairs cuts each batch of 4 into 3 + 1: the step must still be the mean over the 4
    pairs (a mean of the micro-batches' means would weigh the lone pair 3 times too much)."""
    calls = []
    real = loop.local_step

    def counting(parts, batch, *args):
        calls.append(batch.num_pairs)
        return real(parts, batch, *args)

    common = ("steps=2", "save_every=2")
    assert run(tmp_path / "whole", plain_ckpt, demo_corpus, *common, "max_batch_seconds=null") == 0
    loop.local_step = counting
    try:
        assert run(tmp_path / "cut", plain_ckpt, demo_corpus, *common, "max_batch_seconds=6.01") == 0
    finally:
        loop.local_step = real
    assert calls == [3, 1, 3, 1]
    base = torch.load(plain_ckpt, weights_only=True)["model_weight"]
    assert_same_training(weights(tmp_path / "whole"), weights(tmp_path / "cut"), base)
    assert state(tmp_path / "whole")["pairs"] == state(tmp_path / "cut")["pairs"] == 8


class OutOfMemoryAt:
    """``pair_loss`` raising ``torch.OutOfMemoryError`` in the forward (with the model's activations alive)
    or in the backward (a hook on the projections) of micro-batch ``call``; it keeps a weak reference to
    that micro-batch's activations."""

    def __init__(self, where: str, call: int, real) -> None:
        self.where, self.call, self.real, self.calls, self.activation = where, call, real, 0, None

    def __call__(self, loss_fn, z, frames, num_pairs):
        self.calls += 1
        if self.calls == self.call:
            self.activation = weakref.ref(z)
            if self.where == "forward":
                raise torch.OutOfMemoryError("CUDA out of memory (simulated, forward)")
            z.register_hook(self.fail)
        return self.real(loss_fn, z, frames, num_pairs)

    @staticmethod
    def fail(grad):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, backward)")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_with_live_activations_skips_the_step_and_frees_them(
    tmp_path, plain_ckpt, demo_corpus, monkeypatch, where
):
    real_step = loop.train_step
    fault = OutOfMemoryAt(where, 3, loop.pair_loss)  # step 2's first of 2 micro-batches
    freed = []

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if fault.activation is not None and not freed:
            freed.append(fault.activation() is None)  # gone when the step returns
        return result

    monkeypatch.setattr(loop, "pair_loss", fault)
    monkeypatch.setattr(loop, "train_step", step)
    budget = "max_batch_seconds=4.01"  # 2 pairs of 1 s views: a batch of 4 runs as 2 micro-batches
    assert run(tmp_path / "run", plain_ckpt, demo_corpus, "steps=3", "save_every=3", budget) == 0
    assert freed == [True] and fault.calls == 2 + 1 + 2 * 2
    saved = state(tmp_path / "run")
    assert saved["step"] == 3 and saved["counters"]["oom"] == 1 and saved["pairs"] == 3 * 4
    assert saved["data_position"]["batch"] == 4  # the skipped step's batch is passed, not retried


def test_a_non_finite_micro_batch_ends_the_step_and_releases_its_graph(
    tmp_path, plain_ckpt, demo_corpus, monkeypatch
):
    real_loss, real_step = loop.pair_loss, loop.train_step
    calls, graph, freed = [], [], []

    def nan_at_third(loss_fn, z, frames, num_pairs):
        calls.append(num_pairs)
        out = real_loss(loss_fn, z, frames, num_pairs)
        if len(calls) == 3:  # step 2, micro-batch 1 of 2
            graph.append(weakref.ref(z))
            out = out._replace(loss=out.loss * float("nan"))
        return out

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if graph and not freed:
            freed.append(graph[0]() is None)
        return result

    monkeypatch.setattr(loop, "pair_loss", nan_at_third)
    monkeypatch.setattr(loop, "train_step", step)
    budget = "max_batch_seconds=4.01"
    assert run(tmp_path / "run", plain_ckpt, demo_corpus, "steps=2", "save_every=2", budget) == 0
    assert len(calls) == 2 + 1 + 2  # step 1: 2 micro-batches; the skipped step: 1 of its 2; step 2: 2
    assert freed == [True]
    saved = state(tmp_path / "run")
    assert saved["step"] == 2 and saved["counters"]["nonfinite"] == 1 and saved["pairs"] == 2 * 4


def test_the_first_adamw_step_allocates_nothing_after_the_agreement(tmp_path, tiny_hubert_ckpt, demo_corpus):
    """AdamW's state exists before the ranks agree on the first step (so that running out of memory making
    it is the agreed skip), and is what AdamW's own first step makes: the same weights after 2 steps."""
    from s3prl_laser.training.config import resolve_config
    from s3prl_laser.training.parts import build_model
    from s3prl_laser.training.ranks import DistEnv

    cfg = resolve_config("hubert", overrides=[f"ckpt={tiny_hubert_ckpt}", "lr=1e-3"])
    trained = []
    for prepare in (True, False):
        torch.manual_seed(0)
        parts = build_model(cfg, DistEnv())
        params = parts.trainable()
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            if prepare:
                loop.init_optimizer_state(parts.optimizer)
                assert all(len(parts.optimizer.state[p]) == 3 for p in params)
            parts.optimizer.step()
        trained.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))
