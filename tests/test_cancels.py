"""Cancels are guarded transitions: each at every hook where it is allowed, and where it is not."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from helpers import Raiser, batches_dls, mlp

from fsm_learner import (
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    DataLoaders,
    Hook,
    IllegalCancelError,
    Learner,
    State,
)
from fsm_learner.testing import RecordingCallback

H = Hook
TRAIN_BATCH = [
    H.BEFORE_BATCH,
    H.AFTER_PREDICT,
    H.AFTER_LOSS,
    H.AFTER_BACKWARD,
    H.AFTER_STEP,
    H.AFTER_BATCH,
]
VALID_BATCH = [H.BEFORE_BATCH, H.AFTER_PREDICT, H.AFTER_LOSS, H.AFTER_BATCH]
# fit(1) over 2 training batches and 1 validation batch
NORMAL = [
    H.BEFORE_FIT,
    H.BEFORE_EPOCH,
    *TRAIN_BATCH,
    *TRAIN_BATCH,
    H.AFTER_EPOCH,
    H.BEFORE_EPOCH,
    *VALID_BATCH,
    H.AFTER_EPOCH,
    H.AFTER_FIT,
]
SECOND_TRAIN_BATCH = 2 + len(TRAIN_BATCH)
VALID_PASS = 2 + 2 * len(TRAIN_BATCH) + 1


def run(plan, *, n_train=2, n_valid=1):
    rec = RecordingCallback(order=-1)
    raiser = Raiser(plan)
    learn = Learner(mlp(), batches_dls(n_train, n_valid), F.cross_entropy, 0.1, [raiser, rec])
    return learn, rec, raiser


class TestCancelBatch:
    @pytest.mark.parametrize("hook", TRAIN_BATCH)
    def test_at_each_batch_hook(self, hook):
        """Raised anywhere from before_batch to after_batch, it abandons that batch only."""
        learn, rec, _ = run({(hook, 1): CancelBatchException})
        learn.fit(1)
        cut = NORMAL.index(hook) + 1
        assert [*NORMAL[:cut], H.AFTER_CANCEL_BATCH, *NORMAL[SECOND_TRAIN_BATCH:]] == rec.hooks
        cancel = rec.records[cut]
        assert (cancel.state, cancel.iter, cancel.training) == (State.EPOCH, 0, True)
        assert learn.state == "idle"

    def test_in_validation_after_batch(self):
        """A validation batch's after_batch runs in state loss and may cancel it too."""
        learn, rec, _ = run({(H.AFTER_BATCH, 3): CancelBatchException})
        learn.fit(1)
        assert [*NORMAL[:-2], H.AFTER_CANCEL_BATCH, *NORMAL[-2:]] == rec.hooks

    def test_from_the_loss_function(self):
        """A cancel raised by the loss function (not a hook) takes the same transition."""
        calls = []

        def loss(preds, y):
            calls.append(1)
            if len(calls) == 1:
                raise CancelBatchException
            return F.cross_entropy(preds, y)

        rec = RecordingCallback()
        Learner(mlp(), batches_dls(2, 1), loss, 0.1, [rec]).fit(1)
        assert [*NORMAL[:4], H.AFTER_CANCEL_BATCH, *NORMAL[SECOND_TRAIN_BATCH:]] == rec.hooks


class TestCancelEpoch:
    @pytest.mark.parametrize("hook", [H.BEFORE_EPOCH, H.AFTER_LOSS, H.AFTER_STEP, H.AFTER_EPOCH])
    def test_abandons_the_training_pass(self, hook):
        """From before_epoch to the end of after_epoch; inner batches get no after_cancel."""
        learn, rec, _ = run({(hook, 1): CancelEpochException})
        learn.fit(1)
        cut = NORMAL.index(hook) + 1
        assert [*NORMAL[:cut], H.AFTER_CANCEL_EPOCH, *NORMAL[VALID_PASS:]] == rec.hooks
        assert rec.records[cut].state == State.FIT

    def test_escalates_from_after_cancel_batch(self):
        """after_cancel_batch runs in state epoch, where a CancelEpochException is legal."""
        learn, rec, _ = run(
            {
                (H.AFTER_LOSS, 1): CancelBatchException,
                (H.AFTER_CANCEL_BATCH, 1): CancelEpochException,
            },
        )
        learn.fit(1)
        cancel = [*NORMAL[:5], H.AFTER_CANCEL_BATCH, H.AFTER_CANCEL_EPOCH]
        assert [*cancel, *NORMAL[VALID_PASS:]] == rec.hooks


class TestCancelFit:
    @pytest.mark.parametrize(
        "hook",
        [H.BEFORE_FIT, H.BEFORE_EPOCH, H.AFTER_BACKWARD, H.AFTER_EPOCH, H.AFTER_FIT],
    )
    def test_abandons_the_fit(self, hook):
        """From before_fit to the end of after_fit; after_cancel_fit is the last hook."""
        learn, rec, _ = run({(hook, 1): CancelFitException})
        learn.fit(1)
        cut = NORMAL.index(hook) + 1
        assert [*NORMAL[:cut], H.AFTER_CANCEL_FIT] == rec.hooks
        assert rec.records[-1].state == State.IDLE
        assert learn.state == "idle"
        assert learn.failure is None

    def test_from_after_cancel_epoch(self):
        """after_cancel_epoch runs in state fit, where a CancelFitException is legal."""
        learn, rec, _ = run(
            {
                (H.BEFORE_EPOCH, 1): CancelEpochException,
                (H.AFTER_CANCEL_EPOCH, 1): CancelFitException,
            },
        )
        learn.fit(1)
        assert rec.hooks == [H.BEFORE_FIT, H.BEFORE_EPOCH, H.AFTER_CANCEL_EPOCH, H.AFTER_CANCEL_FIT]


class TestIllegalCancels:
    @pytest.mark.parametrize(
        ("cancel", "hook", "nth", "state"),
        [
            (CancelBatchException, H.BEFORE_EPOCH, 1, "epoch"),
            (CancelBatchException, H.AFTER_EPOCH, 1, "epoch"),
            (CancelBatchException, H.BEFORE_FIT, 1, "fit"),
            (CancelEpochException, H.BEFORE_FIT, 1, "fit"),
            (CancelEpochException, H.AFTER_FIT, 1, "fit"),
        ],
    )
    def test_outside_their_unit(self, cancel, hook, nth, state):
        """The cancel becomes an IllegalCancelError chained from it, and the fit fails."""
        learn, rec, _ = run({(hook, nth): cancel})
        with pytest.raises(IllegalCancelError) as info:
            learn.fit(1)
        assert isinstance(info.value.__cause__, cancel)
        assert f"raised in hook {hook} of Raiser in state '{state}'" in str(info.value)
        assert f"in state '{state}', in hook {hook} of Raiser" in info.value.__notes__[0]
        cut = NORMAL.index(hook) + 1
        assert [*NORMAL[:cut], H.AFTER_FAIL] == rec.hooks
        assert learn.state == "idle"
        assert learn.failure is not None
        assert learn.failure.exception is info.value

    def test_same_level_cancel_in_after_cancel_batch(self):
        """The batch is already abandoned in after_cancel_batch: another CancelBatch is illegal."""
        learn, rec, _ = run(
            {
                (H.BEFORE_BATCH, 1): CancelBatchException,
                (H.AFTER_CANCEL_BATCH, 1): CancelBatchException,
            },
        )
        with pytest.raises(IllegalCancelError, match="where cancel_batch is not allowed"):
            learn.fit(1)
        assert [*NORMAL[:3], H.AFTER_CANCEL_BATCH, H.AFTER_FAIL] == rec.hooks

    def test_cancel_fit_in_after_cancel_fit(self):
        """after_cancel_fit runs in idle, where no cancel is allowed."""
        learn, rec, _ = run(
            {(H.BEFORE_FIT, 1): CancelFitException, (H.AFTER_CANCEL_FIT, 1): CancelFitException},
        )
        with pytest.raises(IllegalCancelError, match="in state 'idle'"):
            learn.fit(1)
        assert rec.hooks == [H.BEFORE_FIT, H.AFTER_CANCEL_FIT, H.AFTER_FAIL]

    def test_from_the_dataloader(self):
        """A CancelBatchException from iterating the data (state epoch) is illegal too."""

        def batches():
            raise CancelBatchException
            yield  # pragma: no cover

        class Loader:
            def __iter__(self):
                return batches()

        rec = RecordingCallback()
        learn = Learner(mlp(), DataLoaders(Loader(), []), F.cross_entropy, 0.1, [rec])
        with pytest.raises(IllegalCancelError, match="outside a hook in state 'epoch'") as info:
            learn.fit(1)
        assert isinstance(info.value.__cause__, CancelBatchException)
        assert rec.hooks == [H.BEFORE_FIT, H.BEFORE_EPOCH, H.AFTER_FAIL]
