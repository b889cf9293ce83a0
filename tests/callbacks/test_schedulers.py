"""BatchSchedCB and EpochSchedCB: torch's schedules, stepped with the optimizer, checked config."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    Where,
    batches_dls,
    callback_of,
    checkpointed_fixture,
    digits_dls,
    mlp,
    resumed_fit,
    same_weights,
    saved_state,
)
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


def one_cycle() -> BatchSchedCB:
    return BatchSchedCB.one_cycle(0.5)


def step_lr() -> EpochSchedCB:
    return EpochSchedCB(lambda opt: StepLR(opt, step_size=1, gamma=0.5))


def sched_learner(make_sched=one_cycle) -> Learner:
    """SGD with momentum, 5 training batches a pass, the schedule and the rates it steps with."""
    return Learner(
        mlp(),
        batches_dls(5, 2),
        F.cross_entropy,
        0.05,
        [make_sched(), StepLrs()],
        opt_func=partial(torch.optim.SGD, momentum=0.9),
        audit_log=None,
    )


ONE_CYCLE_RESUMES = {
    "mid-training": (1, True, 3),
    "end-of-training": (0, True, 5),
    "mid-validation": (0, False, 1),
    "between-epochs": (1, True, 0),
}
STEP_LR_RESUMES = {
    "end-of-training": (0, True, 5),
    "between-passes": (0, False, 0),
    "between-epochs": (1, True, 0),
    "mid-training": (1, True, 2),
}


one_cycle_fit = checkpointed_fixture(sched_learner, 3, ONE_CYCLE_RESUMES.values())
step_lr_fit = checkpointed_fixture(partial(sched_learner, step_lr), 3, STEP_LR_RESUMES.values())


def group_settings(learn) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in learn.opt.param_groups]


def assert_resumed_as(learn: Learner, ref: Learner, at: Where) -> None:
    """The steps after the checkpoint ran at the same rates; weights and settings end the same."""
    epoch, training, batches = at
    steps_left = 15 - 5 * epoch - (batches if training else 5)
    lrs, ref_lrs = callback_of(learn, StepLrs).lrs, callback_of(ref, StepLrs).lrs
    assert len(lrs) == steps_left
    assert lrs == ref_lrs[len(ref_lrs) - steps_left :]
    assert group_settings(learn) == group_settings(ref)
    assert same_weights(learn, ref)


class TestResume:
    @pytest.mark.parametrize("at", ONE_CYCLE_RESUMES.values(), ids=list(ONE_CYCLE_RESUMES))
    def test_a_resumed_one_cycle_continues_at_the_same_rates(self, one_cycle_fit, at):
        """The schedule, weights and settings end as the uninterrupted fit's."""
        ref, files = one_cycle_fit
        assert_resumed_as(resumed_fit(sched_learner, 3, files[at]), ref, at)
        assert len(set(callback_of(ref, StepLrs).lrs)) == 15

    def test_the_checkpoint_holds_the_steps_taken(self, one_cycle_fit):
        """After 3 batches of epoch 1: 5 + 3 steps."""
        state = saved_state(one_cycle_fit[1][1, True, 3], "BatchSchedCB")
        assert state["scheduler"]["last_epoch"] == 8

    @pytest.mark.parametrize("at", STEP_LR_RESUMES.values(), ids=list(STEP_LR_RESUMES))
    def test_an_epoch_schedule_resumed_continues_at_the_same_rates(self, step_lr_fit, at):
        """StepLR halves the rate after each training pass, as in the uninterrupted fit.

        Resumed at the end of a training pass, it steps before any optimizer step of this
        process, without torch's step-order warning (an error here).
        """
        ref, files = step_lr_fit
        assert_resumed_as(resumed_fit(partial(sched_learner, step_lr), 3, files[at]), ref, at)
        assert sorted(set(callback_of(ref, StepLrs).lrs), reverse=True) == [0.05, 0.025, 0.0125]

    def test_at_idle_the_state_is_empty_and_loading_it_does_nothing(self, one_cycle_fit):
        """After the fit no schedule runs: every value is None, and a fresh callback takes it."""
        state = callback_of(one_cycle_fit[0], BatchSchedCB).state_dict()
        assert state == dict.fromkeys(
            ("scheduler", "scheduler_type", "total_steps", "param_groups", "fit_settings")
        )
        fresh = one_cycle()
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

    def test_another_scheduler_s_state_is_refused(self, step_lr_fit):
        """A StepLR schedule cannot continue as a CosineAnnealingLR one."""
        cosine = lambda: EpochSchedCB(lambda opt: CosineAnnealingLR(opt, T_max=3))
        with pytest.raises(
            CheckpointError,
            match=r"holds a 'StepLR' schedule, this fit built a 'CosineAnnealingLR'",
        ):
            resumed_fit(partial(sched_learner, cosine), 3, step_lr_fit[1][1, True, 2])
