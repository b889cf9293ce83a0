"""SingleBatchCB: one training batch runs in full, then the fit is cancelled."""

from __future__ import annotations

import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp

from callbacks.single_batch import SingleBatchCB
from fsm_learner import Callback, CancelBatchException, Hook, Learner, RunStatus, Trigger
from fsm_learner.audit.replay import audit_file
from fsm_learner.exceptions import InvalidCallbackError
from fsm_learner.testing import RecordingCallback

H = Hook


def test_one_training_batch_then_cancel_fit():
    """The whole trace (the cleanup hooks of the batch, the pass and the fit after the
    cancel's own hook), the audit log's cancel_fit and note, and the one step taken."""
    rec = RecordingCallback()
    learn = Learner(mlp(), batches_dls(5, 2), F.cross_entropy, 0.5, [rec, SingleBatchCB()])
    before = learn.model[0].weight.detach().clone()
    result = learn.fit(3)
    assert rec.hooks == [
        H.BEFORE_FIT,
        H.BEFORE_EPOCH,
        H.BEFORE_BATCH,
        H.AFTER_PREDICT,
        H.AFTER_LOSS,
        H.AFTER_BACKWARD,
        H.AFTER_STEP,
        H.AFTER_BATCH,
        H.AFTER_CANCEL_FIT,
        H.CLEANUP_BATCH,
        H.CLEANUP_EPOCH,
        H.CLEANUP_FIT,
    ]
    assert result.status is RunStatus.CANCELLED
    assert learn.state == "idle"
    report = audit_file(result.audit_path)[0][0]
    assert report.status is RunStatus.CANCELLED
    assert report.cancels == {"cancel_batch": 0, "cancel_epoch": 0, "cancel_fit": 1}
    assert report.counts[Trigger.STEP.value, True] == 1
    records = [orjson.loads(line) for line in result.audit_path.read_bytes().splitlines()]
    (note,) = [r for r in records if r["ev"] == "note"]
    assert (note["name"], note["ep"], note["it"], note["tr"]) == ("single_batch", 0, 0, True)
    assert not torch.equal(before, learn.model[0].weight)


def test_the_first_completed_batch_counts():
    """A batch cancelled by another callback is not the one: the next one is."""

    class SkipFirst(Callback):
        def before_batch(self, learn):
            if learn.iter == 0:
                raise CancelBatchException

    learn = Learner(mlp(), batches_dls(5, 2), F.cross_entropy, 0.5, [SkipFirst(), SingleBatchCB()])
    result = learn.fit(1)
    report = audit_file(result.audit_path)[0][0]
    assert report.cancels == {"cancel_batch": 1, "cancel_epoch": 0, "cancel_fit": 1}
    assert report.counts[Trigger.STEP.value, True] == 1
    assert learn.iter == 1


class TestState:
    def test_state_with_keys_is_refused(self):
        """It keeps no state (test_state.py checks the empty one); one with keys is refused."""
        with pytest.raises(
            InvalidCallbackError, match=r"SingleBatchCB was given state \(done\) but keeps none"
        ):
            SingleBatchCB().load_state_dict({"done": True})
