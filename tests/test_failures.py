"""Any other exception takes the failure transition, is re-raised with a note, and loses nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Boom, Raiser, batches_dls, mlp
from test_cancels import NORMAL, SECOND_TRAIN_BATCH, run
from torch import nn

from fsm_learner import (
    Callback,
    CancelBatchException,
    CancelFitException,
    DataLoaders,
    Hook,
    Learner,
    State,
)
from fsm_learner.testing import RecordingCallback

H = Hook


class TestFailureInACallback:
    @pytest.mark.parametrize("hook", list(dict.fromkeys(NORMAL)))
    def test_at_each_hook(self, hook):
        """The same exception object is re-raised, noted with state, hook and callback."""
        learn, rec, _ = run({(hook, 1): Boom})
        with pytest.raises(Boom) as info:
            learn.fit(1)
        cut = NORMAL.index(hook) + 1
        assert [*NORMAL[:cut], H.AFTER_FAIL] == rec.hooks
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
        learn, rec, _ = run({(H.AFTER_LOSS, 2): KeyboardInterrupt})
        with pytest.raises(KeyboardInterrupt):
            learn.fit(1)
        assert rec.hooks[-2:] == [H.AFTER_LOSS, H.AFTER_FAIL]
        assert learn.state == "idle"

    def test_error_in_after_cancel_batch_fails_in_state_epoch(self):
        """after_cancel_batch runs in state epoch; an error there is noted as such."""
        learn, rec, _ = run(
            {(H.BEFORE_BATCH, 1): CancelBatchException, (H.AFTER_CANCEL_BATCH, 1): Boom}
        )
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert "in state 'epoch', in hook after_cancel_batch" in info.value.__notes__[0]
        assert isinstance(info.value.__context__, CancelBatchException)
        assert [*NORMAL[:3], H.AFTER_CANCEL_BATCH, H.AFTER_FAIL] == rec.hooks

    def test_error_in_after_fail_does_not_hide_the_first(self):
        """after_fail hooks all run; their own errors become notes on the first exception."""
        learn, rec, _ = run({(H.AFTER_PREDICT, 1): Boom, (H.AFTER_FAIL, 1): ValueError})
        late = RecordingCallback(order=5)
        learn.cbs.append(late)
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert info.value.__notes__[1] == (
            "fsm_learner: then after_fail of Raiser raised ValueError (ignored)"
        )
        assert late.hooks == [*NORMAL[:3], H.AFTER_FAIL]
        assert rec.hooks == [*NORMAL[:4], H.AFTER_FAIL]


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
        assert [*NORMAL[:3], H.AFTER_FAIL] == rec.hooks
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
        assert [*NORMAL[:6], H.AFTER_FAIL] == rec.hooks

    def test_in_the_dataloader(self):
        """An error while iterating the data fails in state epoch."""

        class Loader:
            def __iter__(self):
                yield from batches_dls(1, 0).train
                raise Boom("disk")

        learn = Learner(mlp(), DataLoaders(Loader(), []), F.cross_entropy, 0.1)
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert info.value.__notes__[:1] == ["fsm_learner: Boom in state 'epoch'"]


class TestAfterAFailure:
    def test_the_learner_fits_again(self):
        """After a failure the learner is idle and a new fit runs the whole normal path."""
        learn, rec, raiser = run({(H.AFTER_STEP, 1): Boom})
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
                seen.append((learn.state, learn.failure.state, type(learn.failure.exception)))

        learn, _, _ = run({(H.BEFORE_BATCH, 2): Boom})
        learn.cbs.append(Look())
        with pytest.raises(Boom):
            learn.fit(1)
        assert seen == [(State.IDLE, State.BATCH, Boom)]
        assert NORMAL[SECOND_TRAIN_BATCH] == H.BEFORE_BATCH


class TestReviewFindings:
    def test_a_bare_cancel_exception_from_the_model_fails_cleanly(self):
        """The base CancelException is no cancel: IllegalCancelError; the learner stays usable."""
        from fsm_learner import CancelException, IllegalCancelError
        from fsm_learner.audit.replay import audit_file

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

    def test_fit_cannot_start_while_the_last_one_closes(self):
        """fit() from after_cancel_fit is refused: the outer run keeps its own, complete log."""
        from fsm_learner import InvalidTransitionError
        from fsm_learner.audit.replay import audit_file

        class Again(Callback):
            def after_cancel_fit(self, learn):
                learn.fit(1)

        learn, _, _ = run({(H.BEFORE_FIT, 1): CancelFitException})
        learn.cbs.append(Again())
        with pytest.raises(InvalidTransitionError, match="while a fit is running"):
            learn.fit(1)
        [report], _ = audit_file(learn.audit_path)
        assert report.verified
        assert report.status == "failed"

    def test_note_outside_a_fit_is_refused(self):
        """Notes belong to a run."""
        from fsm_learner import InvalidTransitionError

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1)
        with pytest.raises(InvalidTransitionError, match=r"note\('x'\) outside a fit"):
            learn.note("x", a=1)

    def test_note_checked_when_the_log_is_off_and_for_json(self):
        """A note JSON cannot hold fails in the hook that made it, log on or off."""

        class Big(Callback):
            def before_fit(self, learn):
                learn.note("big", value=2**70)

        for log in (None, "runs"):
            learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Big()], audit_log=log)
            with pytest.raises(TypeError, match="cannot be written as JSON") as info:
                learn.fit(1)
            assert "in hook before_fit of Big" in info.value.__notes__[0]

    def test_equal_but_new_callbacks_are_dispatched(self):
        """The dispatch cache compares identity: a new, equal callback object runs."""
        import attrs

        calls = []

        @attrs.define
        class Tagged(Callback):
            tag: str = "x"

            def before_fit(self, learn):
                calls.append(id(self))

        first = Tagged()
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [first])
        learn.fit(0)
        second = Tagged()
        assert first == second
        learn.cbs[0] = second
        learn.fit(0)
        assert calls == [id(first), id(second)]
