"""BatchSchedCB and EpochSchedCB: torch's schedules, stepped with the optimizer, checked config."""

from __future__ import annotations

from functools import partial

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

from callbacks.grad_accum import GradientAccumulationCB
from callbacks.schedulers import BatchSchedCB, EpochSchedCB
from fsm_learner import Callback, ConfigurationError, DataLoaders, Learner
from fsm_learner.exceptions import CheckpointError


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


class RealStepLrs(Callback):
    """Records the learning rate of each optimizer step that happens (an inner step override)."""

    order = 11

    def __init__(self):
        self.lrs: list[float] = []

    def step(self, learn, proceed):
        self.lrs.append(learn.opt.param_groups[0]["lr"])
        proceed()


class NoLen:
    """Batches that can be iterated again, but have no len()."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


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
        assert sched.scheduler.last_epoch == 14  # never stepped past its last step

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

    def test_each_fit_builds_a_new_scheduler_on_the_kept_optimizer(self):
        """The optimizer persists across fits; each fit gets a new schedule from its start."""
        lrs, cb = StepLrs(), BatchSchedCB.one_cycle(0.5)
        learn = Learner(mlp(), batches_dls(3, 1), F.cross_entropy, 0.1, [cb, lrs])
        learn.fit(2)
        first, opt = cb.scheduler, learn.opt
        learn.fit(2)
        assert learn.opt is opt
        assert cb.scheduler is not first
        assert lrs.lrs[:6] == lrs.lrs[6:] == one_cycle_by_hand(0.5, total_steps=6)

    def test_the_optimizer_ends_at_the_schedule_s_final_rate(self):
        """One-cycle leaves lr and momentum where its last step had them (the final rate,
        initial_lr / final_div_factor) and removes the keys it added; setting learn.lr
        then sets the rate a plain fit trains at."""
        lrs, cb = StepLrs(), BatchSchedCB.one_cycle(0.5)
        sgd = partial(torch.optim.SGD, momentum=0.5)
        learn = Learner(mlp(), batches_dls(3, 1), F.cross_entropy, 0.1, [cb, lrs], sgd)
        learn.fit(1)
        assert learn.opt is not None
        (group,) = learn.opt.param_groups
        final = one_cycle_by_hand(0.5, total_steps=3)[-1]
        assert final == pytest.approx(0.5 / 25 / 1e4)
        assert {k: v for k, v in group.items() if k != "params"} == {
            **learn.opt.defaults,
            "lr": final,
            "momentum": 0.95,  # OneCycleLR's max_momentum, where its cycle ends
        }
        learn.cbs = [lrs]
        learn.lr = 0.05
        learn.fit(1)
        assert lrs.lrs[3:] == [0.05] * 3

    def test_a_failed_fit_also_removes_the_schedule_s_keys(self):
        """cleanup_fit runs whatever the route: after a failure mid-schedule the param
        groups hold no scheduler key, and lr is the rate of the last step taken."""

        class Fail(Callback):
            def after_step(self, learn):
                if learn.iter == 1:
                    raise RuntimeError("boom")

        learn = Learner(mlp(), batches_dls(3, 1), F.cross_entropy, 0.1)
        learn.cbs = [BatchSchedCB.one_cycle(0.5), Fail()]
        with pytest.raises(RuntimeError, match="boom"):
            learn.fit(1)
        assert learn.opt is not None
        assert learn.opt.param_groups[0]["lr"] == one_cycle_by_hand(0.5, total_steps=3)[2]
        assert "initial_lr" not in learn.opt.param_groups[0]

    def test_zero_epochs_do_not_fail(self):
        """A fit of no epoch builds a one-step schedule rather than failing."""
        learn = Learner(mlp(), batches_dls(3, 1), F.cross_entropy, 0.1, [BatchSchedCB.one_cycle(1)])
        assert learn.fit(0).status == "completed"


class TestWithAccumulation:
    def test_one_cycle_ends_at_its_final_rate_on_digits(self):
        """4 epochs of 22 batches, accumulation 4: 6 real steps a pass (the last group of 2
        steps too), 24 in all; the last one runs at initial_lr / final_div_factor, and the
        model learns."""
        model, dls = mlp(), digits_dls(batch_size=64)
        assert len(dls.train) == 22
        real, seen = RealStepLrs(), []

        def one_cycle(opt, n):
            seen.append(n)
            return OneCycleLR(opt, 0.5, total_steps=n)

        sched = BatchSchedCB(with_total_steps=one_cycle)
        cbs = [GradientAccumulationCB(4), sched, real]
        learn = Learner(model, dls, F.cross_entropy, 0.1, cbs, audit_log=None)
        learn.fit(4)
        assert seen == [24]
        assert len(real.lrs) == 24
        assert sched.scheduler is not None
        assert sched.scheduler.last_epoch == 23
        assert real.lrs == pytest.approx(one_cycle_by_hand(0.5, total_steps=24), rel=1e-9)
        assert real.lrs[-1] == pytest.approx(0.5 / 25 / 1e4, rel=1e-6)
        assert learn.opt.param_groups[0]["lr"] == pytest.approx(0.5 / 25 / 1e4, rel=1e-6)
        assert real.lrs[0] == pytest.approx(0.5 / 25, rel=1e-6)
        assert max(real.lrs) == pytest.approx(0.5, rel=1e-2)  # the peak falls between steps
        assert valid_accuracy(model, dls.valid) > 0.8

    def test_one_cycle_factory_counts_the_same_steps(self):
        """one_cycle(max_lr) under accumulation 4: 2 passes of 5 batches, 2 steps each."""
        real, sched = RealStepLrs(), BatchSchedCB.one_cycle(0.5, final_div_factor=100.0)
        cbs = [GradientAccumulationCB(4), sched, real]
        Learner(mlp(), batches_dls(5, 1), F.cross_entropy, 0.1, cbs, audit_log=None).fit(2)
        assert sched.scheduler is not None
        assert sched.scheduler.total_steps == 4
        assert real.lrs[-1] == pytest.approx(0.5 / 25 / 100, rel=1e-6)


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
        """Total steps need len(dls.train): the message names the type that has none."""
        batches = batches_dls(2, 1)
        dls = DataLoaders(NoLen(batches.train), batches.valid)
        learn = Learner(mlp(), dls, F.cross_entropy, 0.1, [BatchSchedCB.one_cycle(0.5)])
        with pytest.raises(ConfigurationError, match=r"dls\.train \(NoLen\) has no len"):
            learn.fit(1)
        assert learn.state == "idle"

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


class ResumeAt(Callback):
    """Rebuilds ``cb`` as a resume from a checkpoint does, at the end of one batch or pass.

    ``at`` is ``(epoch, training, iter)`` for a checkpoint after that batch, or
    ``(epoch, training, None)`` after that pass. There, ``cb.state_dict()`` goes through
    ``torch.save`` and ``torch.load(weights_only=True)``; a fresh ``make()`` runs
    ``before_fit`` (and ``before_epoch`` mid-pass), as the resumed fit fires them, then
    loads it; ``cb`` takes the fresh one's attributes, so the fit's dispatch goes on with
    the rebuilt state. The gradients are put back as the learner does.
    """

    order = 1000  # after every callback's cleanup hooks: where a checkpoint is taken

    def __init__(self, cb, make, path, at):
        self.cb, self.make, self.path, self.at = cb, make, path, at
        self.state: dict | None = None

    def cleanup_batch(self, learn):
        if (learn.epoch, learn.training, learn.iter) == self.at:
            self._resume(learn, mid_pass=True)

    def cleanup_epoch(self, learn):
        if (learn.epoch, learn.training, None) == self.at:
            self._resume(learn, mid_pass=False)

    def _resume(self, learn, *, mid_pass):
        torch.save(self.cb.state_dict(), self.path)
        self.state = torch.load(self.path, weights_only=True)
        grads = [None if p.grad is None else p.grad.clone() for p in learn.model.parameters()]
        fresh = self.make()
        fresh.before_fit(learn)
        if mid_pass:
            fresh.before_epoch(learn)
        for param, grad in zip(learn.model.parameters(), grads, strict=True):
            param.grad = grad
        fresh.load_state_dict(self.state)
        vars(self.cb).clear()
        vars(self.cb).update(vars(fresh))


def round_trip(state: dict, path) -> dict:
    """``state`` through torch.save and torch.load(weights_only=True)."""
    torch.save(state, path)
    return torch.load(path, weights_only=True)


def sched_fit(cb, extra=(), *, momentum: float = 0.9):
    learn = Learner(
        mlp(),
        batches_dls(5, 2),
        F.cross_entropy,
        0.05,
        [cb, *extra],
        opt_func=partial(torch.optim.SGD, momentum=momentum),
        audit_log=None,
    )
    steps = StepLrs()
    learn.cbs = [*learn.cbs, steps]
    learn.fit(3)
    return learn, steps.lrs


def group_settings(learn) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in learn.opt.param_groups]


class TestResume:
    def test_a_one_cycle_resumed_mid_pass_continues_at_the_same_rates(self, tmp_path):
        """Rebuilt after batch 2 of epoch 1, the schedule, weights and settings end as one fit."""
        ref, ref_lrs = sched_fit(BatchSchedCB.one_cycle(0.5))
        cb = BatchSchedCB.one_cycle(0.5)
        resume = ResumeAt(cb, lambda: BatchSchedCB.one_cycle(0.5), tmp_path / "s.pt", (1, True, 2))
        learn, lrs = sched_fit(cb, [resume])
        assert resume.state is not None
        assert resume.state["scheduler"]["last_epoch"] == 8  # 5 + 3 steps taken
        assert lrs == ref_lrs
        assert len(set(lrs)) == 15
        assert group_settings(learn) == group_settings(ref)
        for a, b in zip(learn.model.parameters(), ref.model.parameters(), strict=True):
            assert torch.equal(a, b)

    def test_an_epoch_schedule_resumed_between_passes_continues(self, tmp_path):
        """StepLR rebuilt after epoch 0's validation pass halves the rate as the reference does."""

        def make():
            return EpochSchedCB(lambda opt: StepLR(opt, step_size=1, gamma=0.5))

        ref, ref_lrs = sched_fit(make())
        cb = make()
        learn, lrs = sched_fit(cb, [ResumeAt(cb, make, tmp_path / "s.pt", (0, False, None))])
        assert lrs == ref_lrs
        assert sorted(set(lrs), reverse=True) == [0.05, 0.025, 0.0125]
        assert group_settings(learn) == group_settings(ref)

    def test_at_idle_the_state_is_empty_and_loading_it_does_nothing(self, tmp_path):
        """After the fit no schedule runs: every value is None, and a fresh callback takes it."""
        cb = BatchSchedCB.one_cycle(0.5)
        sched_fit(cb)
        state = round_trip(cb.state_dict(), tmp_path / "s.pt")
        assert state == dict.fromkeys(
            ("scheduler", "scheduler_type", "total_steps", "param_groups", "fit_settings")
        )
        fresh = BatchSchedCB.one_cycle(0.5)
        fresh.load_state_dict(state)
        assert fresh.scheduler is None

    def test_a_state_lacking_keys_is_refused(self):
        """A CheckpointError names the callback and the missing key."""
        with pytest.raises(
            CheckpointError, match=r"BatchSchedCB: the state to load lacks fit_settings"
        ):
            BatchSchedCB.one_cycle(0.5).load_state_dict(
                {
                    "scheduler": None,
                    "scheduler_type": None,
                    "total_steps": None,
                    "param_groups": None,
                }
            )

    def test_another_scheduler_s_state_is_refused(self, tmp_path):
        """A StepLR schedule cannot continue as a OneCycleLR one."""

        def make():
            return EpochSchedCB(lambda opt: StepLR(opt, step_size=1))

        cb = make()
        wrong = EpochSchedCB(lambda opt: CosineAnnealingLR(opt, T_max=3))
        with pytest.raises(
            CheckpointError,
            match=r"holds a 'StepLR' schedule, this fit built a 'CosineAnnealingLR'",
        ):
            sched_fit(cb, [ResumeAt(cb, lambda: wrong, tmp_path / "s.pt", (0, True, 1))])
