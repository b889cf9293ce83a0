"""Cleanup hooks: each unit of work (batch, pass, fit) is cleaned up once it ends, by any route.

A transition that leaves units runs its own hook, changes the state, then the cleanup
hooks of the units it left, innermost first: when a unit completes, is cancelled, or the
run fails (after after_fail). Every cleanup of a route runs even when one raises.
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from helpers import Boom, Raiser, batches_dls, mlp, run_records

from fsm_learner import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Hook,
    IllegalCancelError,
    Learner,
    PartialResultWarning,
    RunKind,
    RunStatus,
    State,
)
from fsm_learner.audit.replay import audit_file
from fsm_learner.testing import HookRecord, RecordingCallback, expected_trace

H, S = Hook, State


def r(hook: Hook, state: State, it: int = 0, training: bool = True) -> HookRecord:
    """A record of epoch 0 (every run here has at most one)."""
    return HookRecord(hook, state, 0, it, training)


def run(kind, plan, *, n_train=1, n_valid=1, extra=()):
    """Run ``kind`` with a Raiser following ``plan``, recorded before and after it.

    Returns the learner, the recorder that runs first, the recorder that runs last (it
    sees every cleanup: they all run), and what the run raised (None when it returned).
    """
    first, last = RecordingCallback(order=-1), RecordingCallback(order=10)
    cbs = [Raiser(plan), first, last, *extra]
    learn = Learner(mlp(), batches_dls(n_train, n_valid), F.cross_entropy, 0.1, cbs)
    start = {RunKind.FIT: lambda: learn.fit(1), RunKind.VALIDATE: learn.validate}
    try:
        start.get(kind, learn.get_preds)()
    except BaseException as exc:
        return learn, first, last, exc
    return learn, first, last, None


def footer(learn: Learner) -> dict:
    """The run_end record of the learner's last run."""
    [end] = [rec for rec in run_records(learn) if rec["ev"] == "run_end"]
    return end


def assert_logged(learn: Learner, status: RunStatus) -> None:
    """The run's log is complete: its footer says ``status`` and the audit verifies it."""
    assert footer(learn)["status"] == status
    [report], problem = audit_file(learn.audit_path)
    assert (problem, report.verified, report.status) == (None, True, status), report.problem


FIT_START = [r(H.BEFORE_FIT, S.FIT, training=False), r(H.BEFORE_EPOCH, S.EPOCH)]
TRAIN_BATCH = [
    r(H.BEFORE_BATCH, S.BATCH),
    r(H.AFTER_PREDICT, S.PREDICT),
    r(H.AFTER_LOSS, S.LOSS),
    r(H.AFTER_BACKWARD, S.BACKWARD),
    r(H.AFTER_STEP, S.STEP),
]


class TestCompletedRuns:
    @pytest.mark.parametrize(
        ("kind", "batches"),
        [(RunKind.FIT, (2, 1)), (RunKind.VALIDATE, (2,)), (RunKind.PREDICT, (2,))],
    )
    def test_each_unit_once_after_its_after_hook(self, kind, batches):
        """cleanup_batch after each after_batch, cleanup_epoch after each after_epoch."""
        learn, first, last, raised = run(kind, {}, n_train=2, n_valid=batches[-1])
        assert raised is None
        assert expected_trace(kind, batches=batches) == first.records == last.records
        fits = 1 if kind is RunKind.FIT else 0
        assert first.hooks.count(H.CLEANUP_FIT) == fits
        assert first.hooks.count(H.CLEANUP_EPOCH) == 1 + fits
        assert first.hooks.count(H.CLEANUP_BATCH) == sum(batches)
        assert_logged(learn, RunStatus.COMPLETED)

    def test_a_cleanup_sees_the_unit_it_ends(self):
        """In cleanup_batch the batch is still there; in cleanup_fit the run is still running."""
        seen: list[tuple] = []

        class Look(Callback):
            def cleanup_batch(self, learn):
                seen.append((H.CLEANUP_BATCH, learn.iter, learn.batch is learn.dl[learn.iter]))

            def cleanup_epoch(self, learn):
                seen.append((H.CLEANUP_EPOCH, learn.training, learn.state))

            def cleanup_fit(self, learn):
                seen.append((H.CLEANUP_FIT, learn.running, learn.state))

        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [Look()])
        learn.fit(1)
        assert seen == [
            (H.CLEANUP_BATCH, 0, True),
            (H.CLEANUP_BATCH, 1, True),
            (H.CLEANUP_EPOCH, True, S.FIT),
            (H.CLEANUP_BATCH, 0, True),
            (H.CLEANUP_EPOCH, False, S.FIT),
            (H.CLEANUP_FIT, True, S.IDLE),
        ]
        assert not learn.running


class TestCancelledRuns:
    def test_cancel_batch(self):
        """after_cancel_batch, then cleanup_batch, both in epoch; the next batch runs."""
        _, first, last, raised = run(RunKind.FIT, {(H.AFTER_LOSS, 1): CancelBatchException})
        assert raised is None
        normal = expected_trace(batches=(1, 1))
        cancelled = [r(H.AFTER_CANCEL_BATCH, S.EPOCH), r(H.CLEANUP_BATCH, S.EPOCH)]
        after_batch = normal.index(r(H.AFTER_BATCH, S.STEP))
        assert [*normal[: after_batch - 2], *cancelled, *normal[after_batch + 2 :]] == first.records
        # the raiser stopped after_loss before the last recorder; the rest it sees too
        assert first.records == [*last.records[:4], r(H.AFTER_LOSS, S.LOSS), *last.records[4:]]

    def test_cancel_epoch_from_a_batch_hook(self):
        """The batch and the pass are left at once: their cleanups run in fit, inner first."""
        _, first, _, raised = run(RunKind.FIT, {(H.AFTER_STEP, 1): CancelEpochException})
        assert raised is None
        validation = expected_trace(batches=(1, 1))[len(FIT_START) + 9 :]
        assert first.records == [
            *FIT_START,
            *TRAIN_BATCH,
            r(H.AFTER_CANCEL_EPOCH, S.FIT),
            r(H.CLEANUP_BATCH, S.FIT),
            r(H.CLEANUP_EPOCH, S.FIT),
            *validation,
        ]
        assert validation[0] == r(H.BEFORE_EPOCH, S.EPOCH, training=False)

    def test_cancel_epoch_from_before_epoch(self):
        """No batch was open: only the pass is cleaned up."""
        _, first, _, raised = run(RunKind.FIT, {(H.BEFORE_EPOCH, 1): CancelEpochException})
        assert raised is None
        assert first.records[:5] == [
            *FIT_START,
            r(H.AFTER_CANCEL_EPOCH, S.FIT),
            r(H.CLEANUP_EPOCH, S.FIT),
            r(H.BEFORE_EPOCH, S.EPOCH, training=False),
        ]

    def test_cancel_fit(self):
        """after_cancel_fit, then the batch's, the pass's and the fit's cleanups, all in idle."""
        learn, first, last, raised = run(RunKind.FIT, {(H.AFTER_BACKWARD, 1): CancelFitException})
        assert raised is None
        assert first.records == [
            *FIT_START,
            *TRAIN_BATCH[:4],
            r(H.AFTER_CANCEL_FIT, S.IDLE),
            r(H.CLEANUP_BATCH, S.IDLE),
            r(H.CLEANUP_EPOCH, S.IDLE),
            r(H.CLEANUP_FIT, S.IDLE),
        ]
        assert last.records == [*first.records[:5], *first.records[6:]]
        assert_logged(learn, RunStatus.CANCELLED)

    @pytest.mark.parametrize("kind", [RunKind.VALIDATE, RunKind.PREDICT])
    def test_cancels_in_inference_runs(self, kind):
        """A validate or predict run has no fit to clean up: its cancels end in idle."""
        plan = {
            (H.AFTER_PREDICT, 1): CancelBatchException,
            (H.BEFORE_BATCH, 2): CancelEpochException,
        }
        with pytest.warns(PartialResultWarning, match=r"cancelled .* after 0 completed batch"):
            learn, first, _, raised = run(kind, plan, n_valid=3)
        assert raised is None
        assert first.records == [
            r(H.BEFORE_EPOCH, S.EPOCH, training=False),
            r(H.BEFORE_BATCH, S.BATCH, 0, False),
            r(H.AFTER_PREDICT, S.PREDICT, 0, False),
            r(H.AFTER_CANCEL_BATCH, S.EPOCH, 0, False),
            r(H.CLEANUP_BATCH, S.EPOCH, 0, False),
            r(H.BEFORE_BATCH, S.BATCH, 1, False),
            r(H.AFTER_CANCEL_EPOCH, S.IDLE, 1, False),
            r(H.CLEANUP_BATCH, S.IDLE, 1, False),
            r(H.CLEANUP_EPOCH, S.IDLE, 1, False),
        ]
        assert_logged(learn, RunStatus.CANCELLED)

    def test_cancel_fit_in_a_validate_run(self):
        """CancelFitException in a validate run cancels the run: no fit, so no cleanup_fit."""
        with pytest.warns(PartialResultWarning, match=r"validate\(\) was cancelled"):
            learn, first, _, raised = run(
                RunKind.VALIDATE, {(H.AFTER_LOSS, 1): CancelFitException}, n_valid=2
            )
        assert raised is None
        assert first.hooks == [
            H.BEFORE_EPOCH,
            H.BEFORE_BATCH,
            H.AFTER_PREDICT,
            H.AFTER_LOSS,
            H.AFTER_CANCEL_FIT,
            H.CLEANUP_BATCH,
            H.CLEANUP_EPOCH,
        ]
        assert_logged(learn, RunStatus.CANCELLED)


class TestFailedRuns:
    def test_failure_in_a_batch_hook(self):
        """after_fail, then the cleanups of every unit open, innermost first, in idle."""
        learn, first, last, raised = run(RunKind.FIT, {(H.AFTER_PREDICT, 1): Boom})
        assert isinstance(raised, Boom)
        ended = [
            r(H.AFTER_FAIL, S.IDLE),
            *(r(h, S.IDLE) for h in (H.CLEANUP_BATCH, H.CLEANUP_EPOCH)),
        ]
        assert first.records == [*FIT_START, *TRAIN_BATCH[:2], *ended, r(H.CLEANUP_FIT, S.IDLE)]
        assert last.records == [*FIT_START, TRAIN_BATCH[0], *ended, r(H.CLEANUP_FIT, S.IDLE)]
        assert_logged(learn, RunStatus.FAILED)

    def test_the_run_is_still_running_in_its_failure_hooks(self):
        """after_fail and the cleanups run in idle, but as part of the run: it closes after them."""
        seen: list[tuple[Hook, bool, State]] = []

        class Look(Callback):
            def after_fail(self, learn):
                seen.append((H.AFTER_FAIL, learn.running, learn.state))

            def cleanup_fit(self, learn):
                seen.append((H.CLEANUP_FIT, learn.running, learn.state))

        learn, _, _, raised = run(RunKind.FIT, {(H.AFTER_LOSS, 1): Boom}, extra=[Look()])
        assert isinstance(raised, Boom)
        assert seen == [(H.AFTER_FAIL, True, S.IDLE), (H.CLEANUP_FIT, True, S.IDLE)]
        assert not learn.running

    def test_failure_in_before_fit(self):
        """Only the fit was open: after_fail, then cleanup_fit."""
        learn, first, _, raised = run(RunKind.FIT, {(H.BEFORE_FIT, 1): Boom})
        assert isinstance(raised, Boom)
        assert first.records == [
            r(H.BEFORE_FIT, S.FIT, training=False),
            r(H.AFTER_FAIL, S.IDLE, training=False),
            r(H.CLEANUP_FIT, S.IDLE, training=False),
        ]
        assert_logged(learn, RunStatus.FAILED)

    def test_failure_in_a_predict_run(self):
        """A predict run has no fit: after_fail, cleanup_batch, cleanup_epoch."""
        learn, first, _, raised = run(RunKind.PREDICT, {(H.AFTER_PREDICT, 2): Boom}, n_valid=2)
        assert isinstance(raised, Boom)
        assert first.hooks == [
            H.BEFORE_EPOCH,
            H.BEFORE_BATCH,
            H.AFTER_PREDICT,
            H.AFTER_BATCH,
            H.CLEANUP_BATCH,
            H.BEFORE_BATCH,
            H.AFTER_PREDICT,
            H.AFTER_FAIL,
            H.CLEANUP_BATCH,
            H.CLEANUP_EPOCH,
        ]
        assert_logged(learn, RunStatus.FAILED)

    def test_the_cleanups_of_the_failure_path_are_guarded(self):
        """A cleanup that raises after a failure is a note on it; the other cleanups still run."""
        plan = {(H.AFTER_LOSS, 1): Boom, (H.CLEANUP_BATCH, 1): ValueError}
        learn, _, last, raised = run(RunKind.FIT, plan)
        assert isinstance(raised, Boom)
        assert last.hooks[-4:] == [H.AFTER_FAIL, H.CLEANUP_BATCH, H.CLEANUP_EPOCH, H.CLEANUP_FIT]
        assert "fsm_learner: then cleanup_batch of Raiser raised ValueError (ignored)" in (
            raised.__notes__
        )
        assert learn.failure is not None
        assert learn.failure.hook is H.AFTER_LOSS
        assert_logged(learn, RunStatus.FAILED)


class Second(Raiser):
    """Another raiser, named apart in notes."""


class TestErrorsInCleanupHooks:
    def test_the_other_cleanups_still_run_and_the_run_fails(self):
        """cleanup_batch raises: the callbacks after it still clean up, then the run fails."""
        learn, first, last, raised = run(RunKind.FIT, {(H.CLEANUP_BATCH, 1): Boom})
        assert isinstance(raised, Boom)
        in_epoch = [r(H.AFTER_BATCH, S.STEP), r(H.CLEANUP_BATCH, S.EPOCH)]
        failed = [r(h, S.IDLE) for h in (H.AFTER_FAIL, H.CLEANUP_EPOCH, H.CLEANUP_FIT)]
        assert first.records == last.records == [*FIT_START, *TRAIN_BATCH, *in_epoch, *failed]
        assert (
            raised.__notes__[0]
            == "fsm_learner: Boom in state 'epoch', in hook cleanup_batch of Raiser"
        )
        assert learn.failure is not None
        assert (learn.failure.state, learn.failure.hook) == (S.EPOCH, H.CLEANUP_BATCH)
        assert_logged(learn, RunStatus.FAILED)

    def test_the_first_error_wins(self):
        """Of the cleanups one route runs, the first error is raised; the later are notes."""
        plan = {(H.AFTER_BACKWARD, 1): CancelFitException, (H.CLEANUP_BATCH, 1): Boom}
        later = Second({(H.CLEANUP_FIT, 1): lambda: ValueError("later")}, order=5)
        learn, first, last, raised = run(RunKind.FIT, plan, extra=[later])
        assert isinstance(raised, Boom)
        assert raised.__notes__[:2] == [
            (
                "fsm_learner: then cleanup_fit of Second raised ValueError: later (it ran "
                "anyway; the first error wins)"
            ),
            "fsm_learner: Boom in state 'idle', in hook cleanup_batch of Raiser",
        ]
        ended = [H.AFTER_CANCEL_FIT, H.CLEANUP_BATCH, H.CLEANUP_EPOCH, H.CLEANUP_FIT, H.AFTER_FAIL]
        assert first.hooks[-5:] == last.hooks[-5:] == ended
        assert_logged(learn, RunStatus.FAILED)

    @pytest.mark.parametrize(
        "cancel", [CancelBatchException, CancelEpochException, CancelFitException]
    )
    @pytest.mark.parametrize("hook", [H.CLEANUP_BATCH, H.CLEANUP_EPOCH, H.CLEANUP_FIT])
    def test_a_cancel_in_a_cleanup_is_illegal(self, cancel, hook):
        """Its unit has ended: the cancel becomes an IllegalCancelError caused by it."""
        learn, _, last, raised = run(RunKind.FIT, {(hook, 1): cancel})
        assert isinstance(raised, IllegalCancelError)
        assert isinstance(raised.__cause__, cancel)
        assert str(raised) == (
            f"{cancel.__name__} raised in cleanup hook {hook} of Raiser: a cleanup hook runs "
            f"after its unit ended and cannot cancel; raise it in the unit's after_ hook instead"
        )
        assert last.hooks.count(hook) == 1
        assert last.hooks[last.hooks.index(hook) + 1] in {H.AFTER_FAIL, H.CLEANUP_FIT}
        assert_logged(learn, RunStatus.FAILED)

    def test_an_error_in_after_cancel_batch_still_cleans_the_batch(self):
        """The cancel left the batch: its cleanup runs before the failure path's."""
        plan = {(H.AFTER_LOSS, 1): CancelBatchException, (H.AFTER_CANCEL_BATCH, 1): Boom}
        learn, first, _, raised = run(RunKind.FIT, plan)
        assert isinstance(raised, Boom)
        assert first.records == [
            *FIT_START,
            *TRAIN_BATCH[:3],
            r(H.AFTER_CANCEL_BATCH, S.EPOCH),
            r(H.CLEANUP_BATCH, S.EPOCH),
            r(H.AFTER_FAIL, S.IDLE),
            r(H.CLEANUP_EPOCH, S.IDLE),
            r(H.CLEANUP_FIT, S.IDLE),
        ]
        assert_logged(learn, RunStatus.FAILED)

    def test_an_error_in_after_cancel_fit_still_cleans_every_unit(self):
        """The cancel left the batch, the pass and the fit: each is cleaned up, then after_fail."""
        plan = {(H.AFTER_STEP, 1): CancelFitException, (H.AFTER_CANCEL_FIT, 1): Boom}
        learn, first, _, raised = run(RunKind.FIT, plan)
        assert isinstance(raised, Boom)
        assert first.hooks[-5:] == [
            H.AFTER_CANCEL_FIT,
            H.CLEANUP_BATCH,
            H.CLEANUP_EPOCH,
            H.CLEANUP_FIT,
            H.AFTER_FAIL,
        ]
        assert_logged(learn, RunStatus.FAILED)

    def test_a_cancel_escalated_in_after_cancel_batch_cleans_the_batch_first(self):
        """after_cancel_batch raises CancelEpochException: cleanup_batch, then the pass's cancel."""
        plan = {
            (H.BEFORE_BATCH, 1): CancelBatchException,
            (H.AFTER_CANCEL_BATCH, 1): CancelEpochException,
        }
        _, first, _, raised = run(RunKind.FIT, plan)
        assert raised is None
        assert first.records[:7] == [
            *FIT_START,
            r(H.BEFORE_BATCH, S.BATCH),
            r(H.AFTER_CANCEL_BATCH, S.EPOCH),
            r(H.CLEANUP_BATCH, S.EPOCH),
            r(H.AFTER_CANCEL_EPOCH, S.FIT),
            r(H.CLEANUP_EPOCH, S.FIT),
        ]

    def test_an_error_in_a_cleanup_beats_a_cancel_on_its_way(self):
        """A cleanup's error is no cancel to swallow: it fails the run, the cancel its context."""
        plan = {
            (H.BEFORE_BATCH, 1): CancelBatchException,
            (H.AFTER_CANCEL_BATCH, 1): CancelEpochException,
            (H.CLEANUP_BATCH, 1): Boom,
        }
        learn, first, _, raised = run(RunKind.FIT, plan)
        assert isinstance(raised, Boom)
        assert isinstance(raised.__context__, CancelEpochException)
        assert first.hooks[3:] == [
            H.AFTER_CANCEL_BATCH,
            H.CLEANUP_BATCH,
            H.AFTER_FAIL,
            H.CLEANUP_EPOCH,
            H.CLEANUP_FIT,
        ]
        assert_logged(learn, RunStatus.FAILED)

    def test_a_keyboard_interrupt_in_a_cleanup(self):
        """Ctrl-C in cleanup_epoch: the later callbacks' cleanups run, then it is re-raised."""
        learn, _, last, raised = run(RunKind.FIT, {(H.CLEANUP_EPOCH, 1): KeyboardInterrupt})
        assert isinstance(raised, KeyboardInterrupt)
        assert last.hooks[-4:] == [H.AFTER_EPOCH, H.CLEANUP_EPOCH, H.AFTER_FAIL, H.CLEANUP_FIT]
        assert (learn.state, learn.running) == (S.IDLE, False)
        assert_logged(learn, RunStatus.FAILED)
