"""GradientAccumulationCB: k small batches step exactly like one k-times-larger batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, digits_tensors, mlp

from callbacks.grad_accum import GradientAccumulationCB
from fsm_learner import Callback, ConfigurationError, DataLoaders, Learner


class CountSteps(Callback):
    """Counts the steps that reach it (an override inner to accumulation)."""

    order = 6

    def __init__(self) -> None:
        self.steps: list[int] = []

    def step(self, learn, proceed):
        self.steps.append(learn.iter)
        proceed()


def digits_batches(sizes: list[int], start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive real digits cut into batches of the given sizes."""
    x, y = digits_tensors()
    out, at = [], start
    for size in sizes:
        out.append((x[at : at + size], y[at : at + size]))
        at += size
    return out


def train(train_batches, cbs, n_epochs=1) -> dict[str, torch.Tensor]:
    """Weights after fitting plain SGD on the given training batches (one validation batch)."""
    dls = DataLoaders(train_batches, digits_batches([8], start=1000))
    learn = Learner(mlp(), dls, F.cross_entropy, 0.5, cbs, torch.optim.SGD, audit_log=None)
    learn.fit(n_epochs)
    return learn.model.state_dict()


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-6)


class TestMatchesALargerBatch:
    @pytest.mark.parametrize("k", [2, 4])
    def test_k_batches_of_8_step_like_one_batch_of_8k(self, k):
        """One optimizer step after k accumulated batches equals one step on their union."""
        steps = CountSteps()
        accumulated = train(batches_dls(k, 1).train, [GradientAccumulationCB(k), steps])
        assert steps.steps == [k - 1]
        plain = train(batches_dls(1, 1, batch_size=8 * k).train, [])
        assert_close(accumulated, plain)
        assert not all(torch.equal(accumulated[n], mlp().state_dict()[n]) for n in accumulated)

    def test_a_shorter_last_group_is_averaged_over_itself(self):
        """5 batches of 8, k=2: steps as batches of 16, 16 and 8 do."""
        steps = CountSteps()
        accumulated = train(digits_batches([8] * 5), [GradientAccumulationCB(2), steps], 2)
        assert steps.steps == [1, 3, 4] * 2
        plain = train(digits_batches([16, 16, 8]), [], 2)
        assert_close(accumulated, plain)

    def test_without_len_the_short_last_group_is_dropped(self):
        """An iterable without len(): the last group of 1 never steps, and does not leak."""

        class NoLen:
            def __init__(self, batches):
                self.batches = batches

            def __iter__(self):
                return iter(self.batches)

        steps = CountSteps()
        accumulated = train(NoLen(digits_batches([8] * 3)), [GradientAccumulationCB(2), steps], 2)
        assert steps.steps == [1, 1]
        plain = train(digits_batches([16]), [], 2)
        assert_close(accumulated, plain)

    def test_one_batch_per_step_is_plain_training(self):
        """n_batches=1 steps every batch: the weights of plain training."""
        assert_close(
            train(batches_dls(3, 1).train, [GradientAccumulationCB(1)]),
            train(batches_dls(3, 1).train, []),
        )


class TestOptimizerSteps:
    @pytest.mark.parametrize(("k", "n", "steps"), [(4, 22, 6), (4, 8, 2), (2, 5, 3), (3, 1, 1)])
    def test_a_pass_steps_once_per_group_the_short_last_one_included(self, k, n, steps):
        """optimizer_steps(n) is the number of steps a real pass of n batches takes."""
        counter = CountSteps()
        train(digits_batches([8] * n), [GradientAccumulationCB(k), counter])
        assert GradientAccumulationCB(k).optimizer_steps(n) == steps == len(counter.steps)


class TestLoss:
    def test_hooks_after_backward_see_the_unscaled_loss(self):
        """learn.loss is divided for the backward pass only."""
        seen: list[bool] = []

        class Look(Callback):
            order = 30

            def after_loss(self, learn):
                self.loss = learn.loss

            def after_batch(self, learn):
                if learn.training:
                    seen.append(learn.loss is self.loss)

        train(batches_dls(3, 1).train, [GradientAccumulationCB(3), Look()])
        assert seen == [True] * 3


class TestConfiguration:
    @pytest.mark.parametrize("n", [0, -2, 1.5, True, "2"])
    def test_bad_n_batches(self, n):
        """n_batches is an int >= 1 (not a bool); the message shows what came."""
        with pytest.raises(ConfigurationError, match=f"n_batches must be an int >= 1.*got {n!r}"):
            GradientAccumulationCB(n)
