"""Recorder: one entry per completed training batch, losses read lazily, a real PNG plot."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    SelfLossMLP,
    as_mappings,
    batches_dls,
    callback_of,
    checkpointed_fixture,
    mlp,
    resumed_fit,
)
from torchmetrics.classification import MulticlassAccuracy

from callbacks.metrics import MetricsCB
from callbacks.recorder import Recorder
from fsm_learner import Callback, CancelBatchException, CancelFitException, Learner
from fsm_learner.exceptions import CheckpointError
from fsm_learner.testing import HostReads

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TrainingLosses(Callback):
    """Reads each completed training batch's loss (a test-only sync)."""

    order = 35

    def __init__(self):
        self.losses: list[float] = []

    def after_batch(self, learn):
        if learn.training:
            self.losses.append(learn.loss.item())


class CancelEveryThirdBatch(Callback):
    """Cancels training batches 0, 3, 6, ... after their loss: they never complete."""

    def after_loss(self, learn):
        if learn.training and learn.iter % 3 == 0:
            raise CancelBatchException


class RaiseLr(Callback):
    """Sets the learning rate of training batch i to 0.01 * (i + 1)."""

    def before_batch(self, learn):
        if learn.training:
            learn.opt.param_groups[0]["lr"] = 0.01 * (learn.iter + 1)


class TestHistory:
    def test_one_entry_per_completed_training_batch(self):
        """Cancelled batches are not recorded; losses are the completed batches' losses."""
        recorder, seen = Recorder(), TrainingLosses()
        cbs = [CancelEveryThirdBatch(), recorder, seen]
        Learner(mlp(), batches_dls(7, 2), F.cross_entropy, 0.1, cbs).fit(2)
        completed = 2 * (7 - 3)  # batches 0, 3 and 6 of each training pass are cancelled
        assert len(recorder.losses) == len(recorder.lrs) == completed
        assert recorder.losses == pytest.approx(seen.losses, rel=1e-6)

    def test_learning_rate_is_the_one_the_step_used(self):
        """lrs holds the rate each training batch's optimizer step ran with."""
        recorder = Recorder()
        Learner(mlp(), batches_dls(4, 1), F.cross_entropy, 0.1, [RaiseLr(), recorder]).fit(2)
        assert recorder.lrs == pytest.approx([0.01, 0.02, 0.03, 0.04] * 2)

    def test_epochs_hold_the_metrics_values(self):
        """With MetricsCB, one row per epoch holds its values."""
        recorder, metrics = Recorder(), MetricsCB(MulticlassAccuracy(10))
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [metrics, recorder]).fit(3)
        assert recorder.epochs == metrics.history
        assert [row["epoch"] for row in recorder.epochs] == [0, 1, 2]

    def test_each_fit_starts_a_new_record(self):
        """A second fit does not append to the first one's record."""
        recorder = Recorder()
        learn = Learner(mlp(), batches_dls(3, 1), F.cross_entropy, 0.1, [recorder])
        learn.fit(2)
        learn.fit(1)
        assert len(recorder.losses) == 3

    def test_a_cancelled_fit_keeps_its_cut_epoch(self):
        """cancel_fit in the second epoch's training pass: its losses and its row are kept
        (the pass ended, by a cancel), and the rows equal the metrics history."""

        class StopAtSecondEpoch(Callback):
            order = 40

            def after_batch(self, learn):
                if learn.epoch == 1 and learn.iter == 1:
                    raise CancelFitException

        recorder, metrics, seen = Recorder(), MetricsCB(MulticlassAccuracy(10)), TrainingLosses()
        cbs = [metrics, recorder, seen, StopAtSecondEpoch()]
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, cbs).fit(3)
        assert recorder.epochs == metrics.history
        assert [row["epoch"] for row in recorder.epochs] == [0, 1]
        assert "valid_loss" not in recorder.epochs[1]
        assert len(recorder.losses) == 5  # 3 + 2: the cancel came after both after_batch hooks
        assert recorder.losses == pytest.approx(seen.losses, rel=1e-6)

    def test_validate_and_predict_runs_leave_the_record(self):
        """Runs that are not a fit neither reset nor extend the fit's record."""
        recorder, metrics = Recorder(), MetricsCB(MulticlassAccuracy(10))
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [metrics, recorder])
        learn.fit(2)
        record = (recorder.losses, recorder.lrs, recorder.epochs)
        learn.validate(batches_dls(3, 0).train)
        learn.get_preds()
        assert (recorder.losses, recorder.lrs, recorder.epochs) == record
        assert len(record[0]) == 6

    def test_mapping_batches(self):
        """Mapping batches to a model that computes its own loss record the same losses."""

        dls = batches_dls(3, 1)
        mapped = as_mappings(dls)
        plain, own = Recorder(), Recorder()
        Learner(mlp(), dls, F.cross_entropy, 0.1, [plain]).fit(2)
        Learner(SelfLossMLP(), mapped, None, 0.1, [own]).fit(2)
        assert len(own.losses) == 6
        assert own.losses == pytest.approx(plain.losses, rel=1e-6)

    def test_no_host_read_per_batch(self):
        """Recording reads nothing back from the device: the losses stay tensors until read."""

        def reads(n_train: int) -> int:
            learn = Learner(mlp(), batches_dls(n_train, 1), F.cross_entropy, 0.1, [Recorder()])
            with HostReads() as counter:
                learn.fit(2)
            return counter.count

        assert reads(2) == reads(6)


class TestPlot:
    def test_plot_writes_a_png(self, tmp_path):
        """plot() writes a real PNG file with the loss, the learning rate and the metrics."""
        recorder, metrics = Recorder(), MetricsCB(MulticlassAccuracy(10))
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [metrics, recorder]).fit(2)
        path = recorder.plot(tmp_path / "history.png")
        assert path == tmp_path / "history.png"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000

    def test_plot_without_metrics(self, tmp_path):
        """Without MetricsCB the plot has the loss and the learning rate only."""
        recorder = Recorder()
        Learner(mlp(), batches_dls(3, 1), F.cross_entropy, 0.1, [recorder]).fit(1)
        assert recorder.plot(str(tmp_path / "h.png")).read_bytes().startswith(PNG_MAGIC)

    def test_missing_matplotlib_names_the_extra(self, monkeypatch):
        """Without matplotlib the error says which extra to install."""
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
        with pytest.raises(ModuleNotFoundError, match=r"fsm-learner\[callbacks\]"):
            Recorder().plot("never.png")


def recorded_learner() -> Learner:
    metrics = MetricsCB(MulticlassAccuracy(num_classes=10))
    return Learner(
        mlp(), batches_dls(4, 2), F.cross_entropy, 0.1, [metrics, Recorder()], audit_log=None
    )


RESUMES = {
    "mid-training": (1, True, 3),
    "mid-validation": (0, False, 1),
    "between-epochs": (1, True, 0),
}


recorded = checkpointed_fixture(recorded_learner, 2, RESUMES.values())


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_record_ends_as_the_uninterrupted_one(self, recorded, at):
        """The learning rates, losses and epoch rows of learn.fit(2, resume_from=...)."""
        ref_learn, files = recorded
        ref = callback_of(ref_learn, Recorder)
        cb = callback_of(resumed_fit(recorded_learner, 2, files[at]), Recorder)
        assert (cb.lrs, cb.losses, cb.epochs) == (ref.lrs, ref.losses, ref.epochs)
        assert len(cb.losses) == 8
        assert [row["epoch"] for row in cb.epochs] == [0, 1]

    def test_losses_and_rates_of_different_lengths_are_refused(self):
        """One loss per learning rate, or a CheckpointError saying so."""
        state = {"lrs": [0.1, 0.1], "losses": torch.ones(3), "epochs": []}
        with pytest.raises(
            CheckpointError,
            match=(
                r"Recorder: state\['losses'\] must be a 1-d tensor with one loss per"
                r" learning rate \(2\), got shape \[3\]"
            ),
        ):
            Recorder().load_state_dict(state)

    def test_a_state_lacking_keys_is_refused(self):
        """The missing key and the expected ones are named."""
        with pytest.raises(
            CheckpointError,
            match=(
                r"Recorder: the state to load lacks epochs; expected the keys lrs,"
                r" losses, epochs"
            ),
        ):
            Recorder().load_state_dict({"lrs": [], "losses": torch.ones(0)})
