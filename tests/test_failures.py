"""Any other exception takes the failure transition, is re-raised with a note, and loses nothing."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import Boom, Raiser, batches_dls, mlp, raising_learner
from torch import nn

from fsm_learner import (
    Callback,
    CancelBatchException,
    CancelException,
    CancelFitException,
    DataLoaders,
    Hook,
    IllegalCancelError,
    InvalidTransitionError,
    Learner,
    State,
)
from fsm_learner.audit.replay import audit_file
from fsm_learner.testing import RecordingCallback, expected_hooks

H = Hook
# fit(1) over 2 training batches and 1 validation batch
NORMAL = expected_hooks(batches=(2, 1))
B, E, F_ = H.CLEANUP_BATCH, H.CLEANUP_EPOCH, H.CLEANUP_FIT
OPEN_UNITS = {
    # the cleanups that follow after_fail when the first call of a hook fails: those of
    # the units still open (a cleanup hook runs once its unit was left)
    H.BEFORE_FIT: [F_],
    H.BEFORE_EPOCH: [E, F_],
    H.BEFORE_BATCH: [B, E, F_],
    H.AFTER_PREDICT: [B, E, F_],
    H.AFTER_LOSS: [B, E, F_],
    H.AFTER_BACKWARD: [B, E, F_],
    H.AFTER_STEP: [B, E, F_],
    H.AFTER_BATCH: [B, E, F_],
    H.CLEANUP_BATCH: [E, F_],
    H.AFTER_EPOCH: [E, F_],
    H.CLEANUP_EPOCH: [F_],
    H.AFTER_FIT: [F_],
    H.CLEANUP_FIT: [],
}


class TestFailureInACallback:
    def test_every_hook_of_the_normal_path_is_covered(self):
        """The table below names every hook a fit runs, and only those."""
        assert list(OPEN_UNITS) == list(dict.fromkeys(NORMAL))

    @pytest.mark.parametrize("hook", list(OPEN_UNITS))
    def test_at_each_hook(self, hook):
        """The same exception object is re-raised, noted with state, hook and callback."""
        learn, rec, _ = raising_learner({(hook, 1): Boom})
        with pytest.raises(Boom) as info:
            learn.fit(1)
        cut = NORMAL.index(hook) + 1
        assert [*NORMAL[:cut], H.AFTER_FAIL, *OPEN_UNITS[hook]] == rec.hooks
        failed_in = rec.records[cut - 1].state
        assert info.value.__notes__[:1] == [
            f"fsm_learner: Boom in state '{failed_in}', in hook {hook} of Raiser",
        ]
        assert learn.failure is not None
        assert (learn.failure.exception, learn.failure.state) == (info.value, failed_in)
        assert (learn.failure.hook, type(learn.failure.callback)) == (hook, Raiser)
        assert learn.state == "idle"

    def test_keyboard_interrupt_takes_the_failure_path(self):
        """KeyboardInterrupt is a failure too, re-raised after after_fail."""
        learn, rec, _ = raising_learner({(H.AFTER_LOSS, 2): KeyboardInterrupt})
        with pytest.raises(KeyboardInterrupt):
            learn.fit(1)
        cut = [i for i, h in enumerate(NORMAL) if h is H.AFTER_LOSS][1] + 1
        assert [*NORMAL[:cut], H.AFTER_FAIL, B, E, F_] == rec.hooks
        assert learn.state == "idle"

    def test_error_in_after_cancel_batch_fails_in_state_epoch(self):
        """after_cancel_batch runs in state epoch; an error there is noted as such."""
        learn, rec, _ = raising_learner(
            {(H.BEFORE_BATCH, 1): CancelBatchException, (H.AFTER_CANCEL_BATCH, 1): Boom}
        )
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert "in state 'epoch', in hook after_cancel_batch" in info.value.__notes__[0]
        assert isinstance(info.value.__context__, CancelBatchException)
        # the batch the cancel left is cleaned up at once, the rest after after_fail
        assert [*NORMAL[:3], H.AFTER_CANCEL_BATCH, B, H.AFTER_FAIL, E, F_] == rec.hooks

    def test_error_in_after_fail_does_not_hide_the_first(self):
        """after_fail hooks all run; their own errors become notes on the first exception."""
        learn, rec, _ = raising_learner({(H.AFTER_PREDICT, 1): Boom, (H.AFTER_FAIL, 1): ValueError})
        late = RecordingCallback(order=5)
        learn.cbs.append(late)
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert info.value.__notes__[1] == (
            "fsm_learner: then after_fail of Raiser raised ValueError (ignored)"
        )
        assert late.hooks == [*NORMAL[:3], H.AFTER_FAIL, B, E, F_]
        assert rec.hooks == [*NORMAL[:4], H.AFTER_FAIL, B, E, F_]


class TestFailureOutsideCallbacks:
    def test_in_the_model(self):
        """A forward error fails in state batch; the note names no hook."""

        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(64, 10)

            def forward(self, x):
                raise Boom("forward")

        rec = RecordingCallback()
        learn = Learner(Broken(), batches_dls(2, 1), F.cross_entropy, 0.1, [rec])
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert info.value.__notes__[:1] == ["fsm_learner: Boom in state 'batch'"]
        assert [*NORMAL[:3], H.AFTER_FAIL, B, E, F_] == rec.hooks
        assert learn.failure is not None
        assert (learn.failure.state, learn.failure.hook) == (State.BATCH, None)

    def test_in_the_loss(self):
        """A loss error (wrong target shape) fails in state predict."""
        rec = RecordingCallback()
        bad = DataLoaders([(torch.randn(4, 64), torch.zeros(5, dtype=torch.int64))], [])
        learn = Learner(mlp(), bad, F.cross_entropy, 0.1, [rec])
        with pytest.raises(ValueError, match="batch_size") as info:
            learn.fit(1)
        assert info.value.__notes__[:1] == ["fsm_learner: ValueError in state 'predict'"]
        assert [*NORMAL[:4], H.AFTER_FAIL, B, E, F_] == rec.hooks

    def test_in_the_optimizer(self):
        """An optimizer error fails in state backward (the step had not completed)."""

        class BadSGD(torch.optim.SGD):
            def step(self, closure=None):
                raise Boom("step")

        rec = RecordingCallback()
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [rec], BadSGD)
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert info.value.__notes__[:1] == ["fsm_learner: Boom in state 'backward'"]
        assert [*NORMAL[:6], H.AFTER_FAIL, B, E, F_] == rec.hooks

    def test_in_the_dataloader(self):
        """An error while iterating the data fails in state epoch."""

        class Loader:
            def __iter__(self):
                yield from batches_dls(1, 0).train
                raise Boom("disk")

        rec = RecordingCallback()
        learn = Learner(mlp(), DataLoaders(Loader(), []), F.cross_entropy, 0.1, [rec])
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert info.value.__notes__[:1] == ["fsm_learner: Boom in state 'epoch'"]
        one_batch = expected_hooks(batches=(1, 0))
        assert [*one_batch[: one_batch.index(B) + 1], H.AFTER_FAIL, E, F_] == rec.hooks

    def test_a_bare_cancel_exception_from_the_model_fails_cleanly(self):
        """The base CancelException is no cancel: IllegalCancelError; the learner stays usable."""

        class Odd(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(64, 10)

            def forward(self, x):
                raise CancelException

        learn = Learner(Odd(), batches_dls(1, 1), F.cross_entropy, 0.1)
        with pytest.raises(IllegalCancelError, match="is not a cancel the machine knows"):
            learn.fit(1)
        assert learn.state == "idle"
        [report], _ = audit_file(learn.audit_path)
        assert (report.verified, report.status) == (True, "failed")


class TestAfterAFailure:
    def test_the_learner_fits_again(self):
        """After a failure the learner is idle and a new fit runs the whole normal path."""
        learn, rec, raiser = raising_learner({(H.AFTER_STEP, 1): Boom})
        with pytest.raises(Boom):
            learn.fit(1)
        rec.records.clear()
        learn.fit(1)
        assert rec.hooks == NORMAL
        assert learn.failure is None
        assert raiser.raised == [(H.AFTER_STEP, 1)]

    def test_failure_is_readable_in_after_fail(self):
        """after_fail runs in idle with learn.failure set."""
        seen = []

        class Look(Callback):
            def after_fail(self, learn):
                failure = learn.failure
                seen.append((learn.state, failure.state, failure.hook, type(failure.exception)))
                seen.append((learn.epoch, learn.iter, learn.training))

        learn, _, _ = raising_learner({(H.BEFORE_BATCH, 2): Boom})
        learn.cbs.append(Look())
        with pytest.raises(Boom):
            learn.fit(1)
        # the second batch failed as it began: its counters are still the learner's
        assert seen == [(State.IDLE, State.BATCH, H.BEFORE_BATCH, Boom), (0, 1, True)]


class TestRunsDoNotNest:
    def test_fit_cannot_start_while_the_last_one_closes(self):
        """fit() from after_cancel_fit is refused: the outer run keeps its own, complete log."""

        class Again(Callback):
            def after_cancel_fit(self, learn):
                learn.fit(1)

        learn, _, _ = raising_learner({(H.BEFORE_FIT, 1): CancelFitException})
        learn.cbs.append(Again())
        with pytest.raises(InvalidTransitionError, match="while a fit run is in progress"):
            learn.fit(1)
        [report], _ = audit_file(learn.audit_path)
        assert report.verified
        assert report.status == "failed"

    @pytest.mark.parametrize(
        ("hook", "call", "what"),
        [
            (H.AFTER_EPOCH, lambda learn: learn.validate(), "validate()"),
            (H.AFTER_BATCH, lambda learn: learn.get_preds(), "get_preds()"),
            (H.CLEANUP_FIT, lambda learn: learn.fit(1), "fit()"),
        ],
    )
    def test_no_run_starts_inside_another(self, hook, call, what):
        """validate(), get_preds() or fit() from any hook of a run fails that run, idle after."""

        class Nested(Callback):
            pass

        def start_a_run(self, learn):
            call(learn)

        setattr(Nested, hook.value, start_a_run)
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Nested()])
        with pytest.raises(
            InvalidTransitionError, match=rf"{re.escape(what)} called in state"
        ) as info:
            learn.fit(1)
        assert f"in hook {hook} of Nested" in info.value.__notes__[0]
        assert (learn.state, learn.running) == ("idle", False)
        [report], _ = audit_file(learn.audit_path)
        assert (report.verified, report.status) == (True, "failed")
