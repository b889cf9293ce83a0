"""GradientAccumulationCB: k small batches step exactly like one k-times-larger batch."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    batches_dls,
    checkpointed_fixture,
    digits_tensors,
    mlp,
    resumed_fit,
    same_weights,
    saved_state,
)

from callbacks.grad_accum import GradientAccumulationCB
from fsm_learner import (
    Callback,
    CancelBatchException,
    ConfigurationError,
    DataLoaders,
    Learner,
)
from fsm_learner.exceptions import CheckpointError


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


def cancelling(hook: str, iters: set[int]) -> Callback:
    """A callback (order 0: before accumulation's) cancelling batches ``iters`` in ``hook``."""

    def cancel(self, learn):
        if learn.training and learn.iter in iters:
            raise CancelBatchException

    return type(f"Cancel{hook.title().replace('_', '')}", (Callback,), {"order": 0, hook: cancel})()


class TestCancelledBatches:
    @pytest.mark.parametrize("hook", ["before_batch", "after_loss", "after_backward"])
    def test_a_cancelled_closing_batch_drops_its_group(self, hook):
        """4 batches, k=2, batch 1 (which closes group 0) cancelled before its step: group 0
        takes no step and leaves nothing; group 1 steps exactly as one batch of its union."""
        steps = CountSteps()
        cbs = [GradientAccumulationCB(2), cancelling(hook, {1}), steps]
        accumulated = train(digits_batches([8] * 4), cbs)
        assert steps.steps == [3]
        assert_close(accumulated, train(digits_batches([16], start=16), []))

    def test_the_step_sees_exactly_the_mean_gradient_of_the_next_group(self):
        """The gradient at group 1's step is the mean of batches 2 and 3's, computed by hand."""
        seen: list[list[torch.Tensor]] = []

        class Grads(Callback):
            order = 6

            def step(self, learn, proceed):
                seen.append([p.grad.clone() for p in learn.model.parameters()])
                proceed()

        train(
            digits_batches([8] * 4),
            [GradientAccumulationCB(2), cancelling("after_loss", {1}), Grads()],
        )
        model = mlp()
        for x, y in digits_batches([8] * 4)[2:]:
            (F.cross_entropy(model(x), y) / 2).backward()
        (at_step,) = seen
        for got, want in zip(at_step, model.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize(
        ("k", "after_backward", "before_backward"),
        [(2, {2}, {2}), (3, {1}, {0, 1}), (3, {0}, {0})],
    )
    def test_a_batch_cancelled_after_its_backward_leaves_no_gradient(
        self, k, after_backward, before_backward
    ):
        """A mid-group batch cancelled in after_backward drops what its group had so far: the
        weights are those of cancelling that batch and the group's earlier ones before their
        backward, which contribute nothing."""
        batches = digits_batches([8] * 4)
        late = train(
            batches, [GradientAccumulationCB(k), cancelling("after_backward", after_backward)]
        )
        early = train(
            batches, [GradientAccumulationCB(k), cancelling("after_loss", before_backward)]
        )
        assert_close(late, early)
        plain = train(batches, [GradientAccumulationCB(k)])
        assert any(not torch.equal(late[n], plain[n]) for n in late)

    def test_a_batch_cancelled_after_its_step_still_counts(self):
        """Cancelled in after_step, the closing batch has stepped: the weights of no cancel."""
        batches = digits_batches([8] * 4)
        cancelled = train(batches, [GradientAccumulationCB(2), cancelling("after_step", {1, 2})])
        assert_close(cancelled, train(batches, [GradientAccumulationCB(2)]))


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


def accum_learner(n_batches: int = 3) -> Learner:
    cbs = [GradientAccumulationCB(n_batches)]
    return Learner(mlp(), batches_dls(7, 2), F.cross_entropy, 0.1, cbs, audit_log=None)


RESUMES = {
    "inside-a-group": (1, True, 5),
    "end-of-a-group": (1, True, 3),
    "mid-validation": (0, False, 1),
    "between-epochs": (1, True, 0),
}


accumulated = checkpointed_fixture(accum_learner, 2, RESUMES.values())


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_ends_with_the_same_weights(self, accumulated, at):
        """Inside a group of 3 the gradients of its first batches come back with the group."""
        ref, files = accumulated
        assert same_weights(resumed_fit(accum_learner, 2, files[at]), ref)

    def test_the_checkpoint_says_whether_a_group_is_open(self, accumulated):
        """After batch 5 of 7 (two of the group 3-5): open; after batch 3: closed."""
        files = accumulated[1]
        open_group = saved_state(files[1, True, 5], "GradientAccumulationCB")
        assert open_group == {"n_batches": 3, "open_group": True}
        closed = saved_state(files[1, True, 3], "GradientAccumulationCB")
        assert closed == {"n_batches": 3, "open_group": False}

    def test_another_group_size_inside_a_group_is_refused(self, accumulated):
        """Gradients divided by 3 cannot go on in groups of 2."""
        with pytest.raises(
            CheckpointError,
            match=r"taken inside a group of n_batches=3 batches, this callback has n_batches=2",
        ):
            resumed_fit(partial(accum_learner, 2), 2, accumulated[1][1, True, 5])

    def test_another_group_size_between_groups_is_fine(self):
        """At idle the next fit accumulates as it is told."""
        cb = GradientAccumulationCB(2)
        cb.load_state_dict({"n_batches": 3, "open_group": False})
        assert cb.state_dict() == {"n_batches": 2, "open_group": False}

    def test_a_wrong_type_is_refused(self):
        """open_group must be a bool."""
        with pytest.raises(
            CheckpointError,
            match=(
                r"GradientAccumulationCB: state\['open_group'\] must be a bool, got 1"
                r" of type int"
            ),
        ):
            GradientAccumulationCB(2).load_state_dict({"n_batches": 2, "open_group": 1})
