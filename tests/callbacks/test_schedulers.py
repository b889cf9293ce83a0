"""BatchSchedCB and EpochSchedCB: torch's schedules, stepped with the optimizer, checked config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, digits_dls, mlp
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)

from callbacks.schedulers import BatchSchedCB, EpochSchedCB
from fsm_learner import Callback, ConfigurationError, DataLoaders, Learner


class StepLrs(Callback):
    """Records the learning rate each optimizer step runs with (read after backward)."""

    def __init__(self):
        self.lrs: list[float] = []

    def after_backward(self, learn):
        self.lrs.append(learn.opt.param_groups[0]["lr"])


class EpochLrs(Callback):
    """Records the learning rate at the start of each training pass."""

    def __init__(self):
        self.lrs: list[float] = []

    def before_epoch(self, learn):
        if learn.training:
            self.lrs.append(learn.opt.param_groups[0]["lr"])


class StepEveryOther(Callback):
    """Gradient accumulation in miniature: the optimizer steps on odd batches only."""

    order = 5

    def step(self, learn, proceed):
        if learn.iter % 2:
            proceed()


def one_cycle_by_hand(max_lr: float, total_steps: int) -> list[float]:
    """The rates torch's OneCycleLR gives an SGD optimizer stepped by hand."""
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    sched = OneCycleLR(opt, max_lr, total_steps=total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def valid_accuracy(model, dl) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in dl:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


class TestBatchSchedCB:
    def test_one_cycle_matches_torch_stepped_by_hand(self):
        """one_cycle(max_lr) gives exactly OneCycleLR's rates over n_epochs * len(train)."""
        lrs, sched = StepLrs(), BatchSchedCB.one_cycle(0.5)
        Learner(mlp(), batches_dls(5, 2), F.cross_entropy, 0.1, [sched, lrs]).fit(3)
        assert lrs.lrs == one_cycle_by_hand(0.5, total_steps=15)
        assert isinstance(sched.scheduler, OneCycleLR)
        assert sched.scheduler.last_epoch == 15

    def test_one_cycle_trains_digits_above_90_percent(self):
        """Three epochs of OneCycle on digits reach more than 90% validation accuracy."""
        model, dls = mlp(), digits_dls(batch_size=64)
        Learner(model, dls, F.cross_entropy, 0.1, [BatchSchedCB.one_cycle(0.5)]).fit(3)
        assert valid_accuracy(model, dls.valid) > 0.9

    def test_with_total_steps_gets_the_fit_s_steps(self):
        """with_total_steps(opt, n) gets n = n_epochs * len(dls.train)."""
        seen: list[int] = []

        def cosine(opt, n):
            seen.append(n)
            return CosineAnnealingLR(opt, T_max=n)

        cb = BatchSchedCB(with_total_steps=cosine)
        Learner(mlp(), batches_dls(4, 1), F.cross_entropy, 0.1, [cb]).fit(2)
        assert seen == [8]

    def test_the_scheduler_steps_only_when_the_optimizer_does(self):
        """A lower-order step override that skips the optimizer also skips the scheduler."""
        cb = BatchSchedCB(lambda opt: StepLR(opt, step_size=1, gamma=0.5))
        Learner(mlp(), batches_dls(6, 1), F.cross_entropy, 0.1, [StepEveryOther(), cb]).fit(1)
        assert cb.scheduler is not None
        assert cb.scheduler.last_epoch == 3
        assert cb.scheduler.get_last_lr() == [pytest.approx(0.1 / 8)]

    def test_each_fit_builds_a_new_scheduler(self):
        """fit() builds a new optimizer, so each fit gets a new schedule from its start."""
        lrs, cb = StepLrs(), BatchSchedCB.one_cycle(0.5)
        learn = Learner(mlp(), batches_dls(3, 1), F.cross_entropy, 0.1, [cb, lrs])
        learn.fit(1)
        first = cb.scheduler
        learn.fit(1)
        assert cb.scheduler is not first
        assert lrs.lrs[:3] == lrs.lrs[3:] == one_cycle_by_hand(0.5, total_steps=3)

    def test_zero_epochs_do_not_fail(self):
        """A fit of no epoch builds a one-step schedule rather than failing."""
        learn = Learner(mlp(), batches_dls(3, 1), F.cross_entropy, 0.1, [BatchSchedCB.one_cycle(1)])
        assert learn.fit(0).status == "completed"


class TestEpochSchedCB:
    def test_steps_at_the_end_of_each_training_pass(self):
        """StepLR(step_size=1, gamma=0.5) halves the rate at each epoch."""
        lrs = EpochLrs()
        cb = EpochSchedCB(lambda opt: StepLR(opt, step_size=1, gamma=0.5))
        Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [cb, lrs]).fit(3)
        assert lrs.lrs == pytest.approx([0.1, 0.05, 0.025])
        assert cb.scheduler is not None
        assert cb.scheduler.last_epoch == 3

    def test_with_total_steps_gets_the_epochs(self):
        """with_total_steps(opt, n) gets n = n_epochs: a cosine over the whole fit."""
        lrs = EpochLrs()
        cb = EpochSchedCB(with_total_steps=lambda opt, n: CosineAnnealingLR(opt, T_max=n))
        Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [cb, lrs]).fit(4)
        assert lrs.lrs == pytest.approx([0.1, 0.0853553, 0.05, 0.0146447], rel=1e-5)


class TestConfiguration:
    def test_a_scheduler_without_total_steps_is_rejected(self):
        """OneCycleLR without total_steps fails at fit start, pointing to one_cycle."""
        cb = BatchSchedCB(lambda opt: OneCycleLR(opt, max_lr=0.1))
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [cb])
        with pytest.raises(ConfigurationError) as info:
            learn.fit(1)
        message = str(info.value)
        assert "raised ValueError: You must define either total_steps" in message
        assert "with_total_steps=lambda opt, n:" in message
        assert "BatchSchedCB.one_cycle(max_lr)" in message
        assert learn.state == "idle"

    def test_a_train_set_without_len_is_rejected(self):
        """Total steps need len(dls.train): an iterator has none, and the message says so."""
        batches = batches_dls(2, 1)
        dls = DataLoaders(iter(batches.train), batches.valid)
        learn = Learner(mlp(), dls, F.cross_entropy, 0.1, [BatchSchedCB.one_cycle(0.5)])
        with pytest.raises(ConfigurationError, match=r"dls\.train \(list_iterator\) has no len"):
            learn.fit(1)

    def test_a_factory_must_return_a_scheduler(self):
        """Something other than an LRScheduler is named in the message."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [EpochSchedCB(lambda o: o)])
        with pytest.raises(ConfigurationError, match=r"must return a torch\.optim\.lr_sched"):
            learn.fit(1)

    def test_reduce_on_plateau_is_rejected(self):
        """ReduceLROnPlateau steps on a metric, which these callbacks do not pass."""
        cb = EpochSchedCB(ReduceLROnPlateau)
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [cb])
        with pytest.raises(ConfigurationError, match="ReduceLROnPlateau, which steps on a metric"):
            learn.fit(1)

    @pytest.mark.parametrize(
        "kwargs",
        [{}, {"sched_func": StepLR, "with_total_steps": StepLR}],
    )
    def test_exactly_one_factory(self, kwargs):
        """Neither or both factories: the message says to give exactly one."""
        with pytest.raises(ConfigurationError, match="give exactly one of sched_func"):
            BatchSchedCB(**kwargs)

    def test_a_factory_must_be_callable(self):
        """A scheduler instance is not a factory: fit builds a new optimizer each time."""
        with pytest.raises(ConfigurationError, match="must be callable"):
            EpochSchedCB(0.5)  # type: ignore[arg-type]

    @pytest.mark.parametrize("max_lr", [0, -1.0, "high", True])
    def test_one_cycle_needs_a_positive_max_lr(self, max_lr):
        """max_lr is a number > 0; the message shows what was received."""
        with pytest.raises(ConfigurationError, match=f"got {max_lr!r}"):
            BatchSchedCB.one_cycle(max_lr)
