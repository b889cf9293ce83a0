"""Cancels are guarded transitions: each at every hook where it is allowed, and where it is not."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from helpers import batches_dls, mlp, raising_learner

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
from fsm_learner.testing import HookRecord, RecordingCallback, expected_hooks, expected_trace

H, S = Hook, State
# fit(1) over 2 training batches and 1 validation batch
NORMAL = expected_hooks(batches=(2, 1))
NORMAL_TRACE = expected_trace(batches=(2, 1))
TRAIN_BATCH = NORMAL[NORMAL.index(H.BEFORE_BATCH) : NORMAL.index(H.CLEANUP_BATCH) + 1]


def after_first(hook: Hook) -> int:
    """The index just past the first call of ``hook`` in the normal trace."""
    return NORMAL.index(hook) + 1


def nth(hook: Hook, n: int) -> int:
    """The index of the n-th call (from 1) of ``hook`` in the normal trace."""
    return [i for i, h in enumerate(NORMAL) if h is hook][n - 1]


SECOND_TRAIN_BATCH = nth(H.BEFORE_BATCH, 2)
VALID_PASS = nth(H.BEFORE_EPOCH, 2)


class TestCancelBatch:
    @pytest.mark.parametrize("hook", TRAIN_BATCH[:-1])
    def test_at_each_batch_hook(self, hook):
        """Raised anywhere from before_batch to after_batch, it abandons that batch only."""
        learn, rec, _ = raising_learner({(hook, 1): CancelBatchException})
        learn.fit(1)
        cut = after_first(hook)
        cancelled = [
            HookRecord(H.AFTER_CANCEL_BATCH, S.EPOCH, 0, 0, True),
            HookRecord(H.CLEANUP_BATCH, S.EPOCH, 0, 0, True),
        ]
        assert [*NORMAL_TRACE[:cut], *cancelled, *NORMAL_TRACE[SECOND_TRAIN_BATCH:]] == rec.records
        assert learn.state == "idle"

    def test_in_validation_after_batch(self):
        """A validation batch's after_batch runs in state loss and may cancel it too."""
        learn, rec, _ = raising_learner({(H.AFTER_BATCH, 3): CancelBatchException})
        learn.fit(1)
        cut = nth(H.AFTER_BATCH, 3) + 1
        cancelled = [
            HookRecord(H.AFTER_CANCEL_BATCH, S.EPOCH, 0, 0, False),
            HookRecord(H.CLEANUP_BATCH, S.EPOCH, 0, 0, False),
        ]
        assert [*NORMAL_TRACE[:cut], *cancelled, *NORMAL_TRACE[cut + 1 :]] == rec.records

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
        cancelled = [H.AFTER_CANCEL_BATCH, H.CLEANUP_BATCH]
        assert [*NORMAL[:4], *cancelled, *NORMAL[SECOND_TRAIN_BATCH:]] == rec.hooks


class TestCancelEpoch:
    @pytest.mark.parametrize(
        ("hook", "units"),
        [
            (H.BEFORE_EPOCH, [H.CLEANUP_EPOCH]),
            (H.AFTER_LOSS, [H.CLEANUP_BATCH, H.CLEANUP_EPOCH]),
            (H.AFTER_STEP, [H.CLEANUP_BATCH, H.CLEANUP_EPOCH]),
            (H.AFTER_EPOCH, [H.CLEANUP_EPOCH]),
        ],
    )
    def test_abandons_the_training_pass(self, hook, units):
        """From before_epoch to the end of after_epoch; the units it left are cleaned up."""
        learn, rec, _ = raising_learner({(hook, 1): CancelEpochException})
        learn.fit(1)
        cut = after_first(hook)
        assert [*NORMAL[:cut], H.AFTER_CANCEL_EPOCH, *units, *NORMAL[VALID_PASS:]] == rec.hooks
        assert {r.state for r in rec.records[cut : cut + 1 + len(units)]} == {S.FIT}

    def test_escalates_from_after_cancel_batch(self):
        """after_cancel_batch runs in state epoch, where a CancelEpochException is legal."""
        learn, rec, _ = raising_learner(
            {
                (H.AFTER_LOSS, 1): CancelBatchException,
                (H.AFTER_CANCEL_BATCH, 1): CancelEpochException,
            },
        )
        learn.fit(1)
        cancel = [H.AFTER_CANCEL_BATCH, H.CLEANUP_BATCH, H.AFTER_CANCEL_EPOCH, H.CLEANUP_EPOCH]
        assert [*NORMAL[:5], *cancel, *NORMAL[VALID_PASS:]] == rec.hooks


class TestCancelFit:
    @pytest.mark.parametrize(
        ("hook", "units"),
        [
            (H.BEFORE_FIT, [H.CLEANUP_FIT]),
            (H.BEFORE_EPOCH, [H.CLEANUP_EPOCH, H.CLEANUP_FIT]),
            (H.AFTER_BACKWARD, [H.CLEANUP_BATCH, H.CLEANUP_EPOCH, H.CLEANUP_FIT]),
            (H.AFTER_EPOCH, [H.CLEANUP_EPOCH, H.CLEANUP_FIT]),
            (H.AFTER_FIT, [H.CLEANUP_FIT]),
        ],
    )
    def test_abandons_the_fit(self, hook, units):
        """From before_fit to the end of after_fit; after_cancel_fit, then the cleanups, in idle."""
        learn, rec, _ = raising_learner({(hook, 1): CancelFitException})
        learn.fit(1)
        cut = after_first(hook)
        assert [*NORMAL[:cut], H.AFTER_CANCEL_FIT, *units] == rec.hooks
        assert {r.state for r in rec.records[cut:]} == {S.IDLE}
        assert learn.state == "idle"
        assert learn.failure is None

    def test_from_after_cancel_epoch(self):
        """after_cancel_epoch runs in state fit, where a CancelFitException is legal."""
        learn, rec, _ = raising_learner(
            {
                (H.BEFORE_EPOCH, 1): CancelEpochException,
                (H.AFTER_CANCEL_EPOCH, 1): CancelFitException,
            },
        )
        learn.fit(1)
        assert rec.hooks == [
            H.BEFORE_FIT,
            H.BEFORE_EPOCH,
            H.AFTER_CANCEL_EPOCH,
            H.CLEANUP_EPOCH,
            H.AFTER_CANCEL_FIT,
            H.CLEANUP_FIT,
        ]


class TestIllegalCancels:
    @pytest.mark.parametrize(
        ("cancel", "hook", "state", "units"),
        [
            (CancelBatchException, H.BEFORE_EPOCH, "epoch", [H.CLEANUP_EPOCH, H.CLEANUP_FIT]),
            (CancelBatchException, H.AFTER_EPOCH, "epoch", [H.CLEANUP_EPOCH, H.CLEANUP_FIT]),
            (CancelBatchException, H.BEFORE_FIT, "fit", [H.CLEANUP_FIT]),
            (CancelEpochException, H.BEFORE_FIT, "fit", [H.CLEANUP_FIT]),
            (CancelEpochException, H.AFTER_FIT, "fit", [H.CLEANUP_FIT]),
        ],
    )
    def test_outside_their_unit(self, cancel, hook, state, units):
        """The cancel becomes an IllegalCancelError chained from it, and the fit fails."""
        learn, rec, _ = raising_learner({(hook, 1): cancel})
        with pytest.raises(IllegalCancelError) as info:
            learn.fit(1)
        assert isinstance(info.value.__cause__, cancel)
        assert f"raised in hook {hook} of Raiser in state '{state}'" in str(info.value)
        assert f"in state '{state}', in hook {hook} of Raiser" in info.value.__notes__[0]
        assert [*NORMAL[: after_first(hook)], H.AFTER_FAIL, *units] == rec.hooks
        assert learn.state == "idle"
        assert learn.failure is not None
        assert learn.failure.exception is info.value

    def test_same_level_cancel_in_after_cancel_batch(self):
        """The batch is already abandoned in after_cancel_batch: another CancelBatch is illegal."""
        learn, rec, _ = raising_learner(
            {
                (H.BEFORE_BATCH, 1): CancelBatchException,
                (H.AFTER_CANCEL_BATCH, 1): CancelBatchException,
            },
        )
        with pytest.raises(IllegalCancelError, match="where cancel_batch is not allowed"):
            learn.fit(1)
        assert rec.hooks == [
            *NORMAL[:3],
            H.AFTER_CANCEL_BATCH,
            H.CLEANUP_BATCH,  # the batch it left is cleaned up, whatever its hook raised
            H.AFTER_FAIL,
            H.CLEANUP_EPOCH,
            H.CLEANUP_FIT,
        ]

    def test_cancel_fit_in_after_cancel_fit(self):
        """after_cancel_fit runs in idle, where no cancel is allowed."""
        learn, rec, _ = raising_learner(
            {(H.BEFORE_FIT, 1): CancelFitException, (H.AFTER_CANCEL_FIT, 1): CancelFitException},
        )
        with pytest.raises(IllegalCancelError, match="in state 'idle'"):
            learn.fit(1)
        assert rec.hooks == [H.BEFORE_FIT, H.AFTER_CANCEL_FIT, H.CLEANUP_FIT, H.AFTER_FAIL]

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
        assert rec.hooks == [
            H.BEFORE_FIT,
            H.BEFORE_EPOCH,
            H.AFTER_FAIL,
            H.CLEANUP_EPOCH,
            H.CLEANUP_FIT,
        ]
