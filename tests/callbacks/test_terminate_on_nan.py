"""TerminateOnNaNCB: a non-finite loss cancels the fit, with the reason in the audit log."""

from __future__ import annotations

import math

import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, checkpointed_fixture, mlp, resumed_fit, saved_state

from callbacks.terminate_on_nan import TerminateOnNaNCB
from fsm_learner import (
    Callback,
    ConfigurationError,
    DataLoaders,
    Learner,
    PartialResultWarning,
    RunStatus,
)
from fsm_learner.audit.replay import audit_file
from fsm_learner.exceptions import CheckpointError


def poisoned(batches, index: int, value: float = float("nan")):
    """Real digits batches with one pixel of batch ``index`` corrupted."""
    out = list(batches)
    x, y = out[index]
    x = x.clone()
    x[0, 0] = value
    out[index] = (x, y)
    return out


def fit(dls, cbs, lr=0.5, loss_func=F.cross_entropy, n_epochs=3):
    learn = Learner(mlp(), dls, loss_func, lr, cbs if isinstance(cbs, list) else [cbs])
    result = learn.fit(n_epochs)
    report = audit_file(result.audit_path)[0][0]
    records = [orjson.loads(line) for line in result.audit_path.read_bytes().splitlines()]
    (note,) = [r for r in records if r["ev"] == "note" and r["name"] == "terminate_on_nan"]
    return learn, result, report, note


class TestCancelsTheFit:
    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_a_corrupt_training_batch_stops_before_its_step(self, value):
        """The bad batch never steps: the weights are those after the batches before it."""
        clean = batches_dls(4, 1)
        dls = DataLoaders(poisoned(clean.train, 2, value), clean.valid)
        learn, result, report, note = fit(dls, TerminateOnNaNCB())
        assert result.status is RunStatus.CANCELLED
        assert report.cancels["cancel_fit"] == 1
        assert report.batches == (2, 0)
        assert note["reason"] == "non-finite loss"
        assert (note["tr"], note["ep"], note["it"]) == (True, 0, 2)
        assert note["loss"] in {"NaN", "Infinity"}  # JSON has neither; float() reads them
        assert note["batches_checked"] == 1
        reference = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.5, audit_log=None)
        reference.fit(1)
        for a, b in zip(learn.model.parameters(), reference.model.parameters(), strict=True):
            assert torch.equal(a, b)

    def test_a_diverging_fit_stops(self):
        """No corrupt data: SGD at lr=100 on a one-hot MSE loss overflows within 3 epochs."""
        losses: list[float] = []

        class Losses(Callback):
            def after_loss(self, learn):
                losses.append(float(learn.loss.detach()))

        def one_hot_mse(preds, y):
            return F.mse_loss(preds, F.one_hot(y, 10).float())

        cbs = [Losses(), TerminateOnNaNCB()]
        _, result, _, note = fit(batches_dls(8, 1), cbs, loss_func=one_hot_mse, lr=100.0)
        assert result.status is RunStatus.CANCELLED
        assert all(math.isfinite(v) for v in losses[:-1])
        assert str(float(note["loss"])) == str(losses[-1])

    def test_a_corrupt_validation_batch_stops_the_fit(self):
        """A NaN in validation batch 1 cancels the fit there."""
        clean = batches_dls(2, 3)
        dls = DataLoaders(clean.train, poisoned(clean.valid, 1))
        _, result, report, note = fit(dls, TerminateOnNaNCB())
        assert result.status is RunStatus.CANCELLED
        assert report.batches == (2, 1)
        assert (note["tr"], note["ep"], note["it"]) == (False, 0, 1)

    def test_finite_losses_complete(self):
        """Finite losses never cancel: the fit completes."""
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.5, [TerminateOnNaNCB()])
        assert learn.fit(2).status is RunStatus.COMPLETED


class TestOtherRuns:
    def test_a_validate_run_is_checked_and_cancelled(self):
        """A NaN in a validate run cancels it at that batch, with the note; the mean covers
        the batch before; a later fit is not cancelled by what the validate run saw."""
        clean = batches_dls(2, 3)
        learn = Learner(mlp(), clean, F.cross_entropy, 0.5, [TerminateOnNaNCB()])
        with pytest.warns(PartialResultWarning, match=r"after 1 completed batch"):
            result = learn.validate(poisoned(clean.valid, 1))
        assert learn.last_result is not None
        assert learn.last_result.status is RunStatus.CANCELLED
        records = [orjson.loads(line) for line in learn.audit_path.read_bytes().splitlines()]
        (note,) = [r for r in records if r["ev"] == "note"]
        assert (note["name"], note["tr"], note["it"], note["batches_checked"]) == (
            "terminate_on_nan",
            False,
            1,
            1,
        )
        assert audit_file(learn.audit_path)[0][0].cancels["cancel_fit"] == 1
        with torch.no_grad():
            x, y = clean.valid[0]
            assert result["loss"] == pytest.approx(F.cross_entropy(learn.model(x), y).item())
        assert learn.fit(1).status is RunStatus.COMPLETED

    def test_a_predict_run_is_not_checked(self):
        """get_preds computes no loss: NaN inputs give NaN predictions, and no cancel."""
        clean = batches_dls(1, 2)
        learn = Learner(mlp(), clean, F.cross_entropy, 0.5, [TerminateOnNaNCB()])
        preds, _ = learn.get_preds(poisoned(clean.valid, 1))
        assert preds.shape == (16, 10)
        assert torch.isnan(preds[8]).all()
        assert torch.isfinite(preds[:8]).all()


class TestCheckEvery:
    def test_the_flag_is_read_every_n_batches(self):
        """check_every=3, bad batch 0: detected at batch 2, covering 3 batches."""
        clean = batches_dls(6, 1)
        dls = DataLoaders(poisoned(clean.train, 0), clean.valid)
        _, result, report, note = fit(dls, TerminateOnNaNCB(check_every=3))
        assert result.status is RunStatus.CANCELLED
        assert (note["it"], note["batches_checked"]) == (2, 3)
        assert report.batches == (2, 0)

    def test_and_at_the_end_of_each_pass(self):
        """check_every=8 over 4 batches: the pass end reads the flag (cancel in after_epoch)."""
        clean = batches_dls(4, 1)
        dls = DataLoaders(poisoned(clean.train, 1), clean.valid)
        _, result, report, note = fit(dls, TerminateOnNaNCB(check_every=8))
        assert result.status is RunStatus.CANCELLED
        assert (note["tr"], note["it"], note["batches_checked"]) == (True, 3, 4)
        assert report.batches == (4, 0)


class TestConfiguration:
    @pytest.mark.parametrize("n", [0, -1, 2.0, True])
    def test_bad_check_every(self, n):
        """check_every is an int >= 1 (not a bool); the message shows what came."""
        with pytest.raises(ConfigurationError, match=f"check_every must be an int >= 1.*got {n!r}"):
            TerminateOnNaNCB(check_every=n)


def nan_learner() -> Learner:
    """An infinite loss at training batch 1 of 6, read only every 4 batches."""
    dls = DataLoaders(poisoned(batches_dls(6, 2).train, 1, math.inf), batches_dls(6, 2).valid)
    cbs = [TerminateOnNaNCB(check_every=4)]
    return Learner(mlp(), dls, F.cross_entropy, 0.1, cbs, audit_log=None)


terminated = checkpointed_fixture(nan_learner, 1, [(0, True, 3)])


class TestResume:
    def test_an_unread_non_finite_loss_still_stops_the_resumed_fit_at_the_same_batch(
        self, terminated
    ):
        """Resumed after batch 2, before the flag was read: batch 3 reads it and stops."""
        ref, files = terminated
        assert saved_state(files[0, True, 3], "TerminateOnNaNCB") == {
            "unchecked": 3,
            "nonfinite": True,
        }
        learn = resumed_fit(nan_learner, 1, files[0, True, 3])
        assert learn.last_result.status is ref.last_result.status is RunStatus.CANCELLED
        stopped_at = (learn.epoch, learn.training, learn.iter)
        assert stopped_at == (ref.epoch, ref.training, ref.iter) == (0, True, 3)

    def test_a_wrong_type_is_refused(self):
        """nonfinite must be a bool."""
        with pytest.raises(
            CheckpointError,
            match=r"TerminateOnNaNCB: state\['nonfinite'\] must be a bool, got 0 of type int",
        ):
            TerminateOnNaNCB().load_state_dict({"unchecked": 0, "nonfinite": 0})
