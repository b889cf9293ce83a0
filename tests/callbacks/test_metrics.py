"""MetricsCB: values agree with a hand computation, reach the audit log, cost no sync per batch."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BatchLosses,
    SelfLossMLP,
    as_mappings,
    batches_dls,
    callback_of,
    checkpointed_fixture,
    digits_dls,
    mlp,
    resumed_fit,
    saved_state,
)
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import MeanSquaredError

from callbacks.metrics import MetricsCB, RunningMean
from fsm_learner import (
    Callback,
    CancelEpochException,
    CancelFitException,
    ConfigurationError,
    DataLoaders,
    Learner,
)
from fsm_learner.exceptions import CheckpointError
from fsm_learner.testing import HostReads


def hand_evaluation(model, dl) -> dict[str, float]:
    """Mean loss over samples, micro and macro accuracy of ``model`` on ``dl``, by hand."""
    model.eval()
    loss_sum, n, correct = 0.0, 0, 0
    per_class_hits, per_class_total = [0] * 10, [0] * 10
    with torch.no_grad():
        for x, y in dl:
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            hits = out.argmax(1) == y
            correct += int(hits.sum())
            n += len(y)
            for label, hit in zip(y.tolist(), hits.tolist(), strict=True):
                per_class_total[label] += 1
                per_class_hits[label] += hit
    recalls = [h / t for h, t in zip(per_class_hits, per_class_total, strict=True) if t]
    return {"loss": loss_sum / n, "accuracy": correct / n, "macro": sum(recalls) / len(recalls)}


def metrics_cb() -> MetricsCB:
    return MetricsCB(
        MulticlassAccuracy(num_classes=10, average="micro"),
        macro=MulticlassAccuracy(num_classes=10),
    )


def metric_notes(path) -> list[dict[str, object]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["ev"] == "note" and r["name"] == "metrics"]


class KeywordMLP(nn.Module):
    """The seeded MLP, taking its input by keyword as models fed mapping batches do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


class TestValues:
    def test_agree_with_a_hand_computation(self):
        """Validation loss and accuracy equal a by-hand pass of the trained model; train loss
        equals the sample-weighted mean of the batch losses."""
        dls, model, metrics, losses = digits_dls(batch_size=64), mlp(), metrics_cb(), BatchLosses()
        Learner(model, dls, F.cross_entropy, 0.5, [metrics, losses]).fit(2)
        hand = hand_evaluation(model, dls.valid)
        assert metrics.values["valid_loss"] == pytest.approx(hand["loss"], rel=1e-5)
        assert metrics.values["valid_accuracy"] == pytest.approx(hand["accuracy"], abs=1e-6)
        assert metrics.values["valid_macro"] == pytest.approx(hand["macro"], abs=1e-6)
        assert metrics.values["train_loss"] == pytest.approx(losses.mean(1, True), rel=1e-5)
        assert metrics.history[0]["valid_loss"] == pytest.approx(losses.mean(0, False), rel=1e-5)
        assert metrics.values["valid_accuracy"] > 0.8

    def test_values_keys_and_history(self):
        """Keys are <pass>_<name> in names() order; history has one row per epoch."""
        metrics = metrics_cb()
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [metrics]).fit(2)
        assert metrics.names() == [
            "train_loss",
            "train_accuracy",
            "train_macro",
            "valid_loss",
            "valid_accuracy",
            "valid_macro",
        ]
        assert list(metrics.values) == metrics.names()
        assert [row["epoch"] for row in metrics.history] == [0, 1]
        assert metrics.history[-1] == {"epoch": 1, **metrics.values}
        assert all(isinstance(v, float) for v in metrics.values.values())

    def test_values_are_written_to_the_audit_log_once_per_pass(self):
        """Each pass end writes a 'metrics' note with the pass's values, as floats."""
        metrics = metrics_cb()
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [metrics])
        result = learn.fit(2)
        assert result.audit_path is not None
        notes = metric_notes(result.audit_path)
        assert [(n["ep"], n["tr"], n["batches"]) for n in notes] == [
            (0, True, 3),
            (0, False, 2),
            (1, True, 3),
            (1, False, 2),
        ]
        last = notes[-1]
        own = {"batches", "complete", "valid_loss", "valid_accuracy", "valid_macro"}
        assert set(last) == {"ev", "run", "ep", "it", "tr", "t", "name", *own}
        assert last["complete"] is True
        assert last["valid_loss"] == metrics.values["valid_loss"]
        assert last["valid_accuracy"] == metrics.values["valid_accuracy"]
        assert "train_loss" not in last

    def test_a_cancelled_pass_reports_its_completed_batches(self):
        """A pass cancelled after two batches gives their mean, noted as not complete."""

        class CancelThirdTrainingBatch(Callback):
            order = 30

            def before_batch(self, learn):
                if learn.training and learn.iter == 2:
                    raise CancelEpochException

        metrics, losses = metrics_cb(), BatchLosses()
        learn = Learner(
            mlp(),
            batches_dls(4, 2),
            F.cross_entropy,
            0.1,
            [metrics, losses, CancelThirdTrainingBatch()],
        )
        result = learn.fit(1)
        assert metrics.values["train_loss"] == pytest.approx(losses.mean(0, True), rel=1e-6)
        assert sum(1 for e, t, _, _ in losses.seen if t) == 2
        notes = metric_notes(result.audit_path)
        assert [(n["tr"], n["batches"], n["complete"]) for n in notes] == [
            (True, 2, False),
            (False, 2, True),
        ]

    def test_a_pass_a_cancelled_fit_cuts_short_reports_too(self):
        """A cancel_fit at training batch 2 ends the pass too (cleanup_epoch): its two
        batches are reported, noted as not complete, and the history has the row."""

        class StopAtThirdBatch(Callback):
            order = 30

            def before_batch(self, learn):
                if learn.iter == 2:
                    raise CancelFitException

        metrics, losses = metrics_cb(), BatchLosses()
        cbs = [metrics, losses, StopAtThirdBatch()]
        result = Learner(mlp(), batches_dls(4, 2), F.cross_entropy, 0.1, cbs).fit(1)
        assert result.status == "cancelled"
        assert metrics.values["train_loss"] == pytest.approx(losses.mean(0, True), rel=1e-6)
        assert metrics.history == [{"epoch": 0, **metrics.values}]
        notes = metric_notes(result.audit_path)
        assert [(n["tr"], n["batches"], n["complete"]) for n in notes] == [(True, 2, False)]

    def test_a_pass_cancelled_before_metrics_saw_it_begin_gives_nan(self):
        """A validation pass cancelled in an earlier callback's before_epoch is reported
        empty (not with the training pass's sums), noted as not complete."""

        class CancelValidation(Callback):
            def before_epoch(self, learn):
                if not learn.training:
                    raise CancelEpochException

        metrics = metrics_cb()
        cbs = [CancelValidation(), metrics]
        result = Learner(mlp(), batches_dls(2, 2), F.cross_entropy, 0.1, cbs).fit(1)
        assert metrics.values["train_loss"] > 0
        assert math.isnan(metrics.values["valid_loss"])
        assert math.isnan(metrics.values["valid_accuracy"])
        assert math.isnan(metrics.last_pass()["loss"])
        notes = metric_notes(result.audit_path)
        assert [(n["tr"], n["batches"], n["complete"]) for n in notes] == [
            (True, 2, True),
            (False, 0, False),
        ]

    def test_a_pass_without_batches_gives_nan(self):
        """An empty validation set gives NaN values rather than a torchmetrics warning."""
        metrics = metrics_cb()
        dls = batches_dls(2, 0)
        Learner(mlp(), dls, F.cross_entropy, 0.1, [metrics]).fit(1)
        assert metrics.values["train_loss"] > 0
        assert torch.isnan(torch.tensor(metrics.values["valid_loss"]))
        assert torch.isnan(torch.tensor(metrics.values["valid_accuracy"]))

    def test_no_host_read_per_batch(self):
        """With metrics that skip input validation, reads happen per pass, not per batch."""

        def reads(n_train: int) -> int:
            metrics = MetricsCB(MulticlassAccuracy(10, average="micro", validate_args=False))
            learn = Learner(mlp(), batches_dls(n_train, 2), F.cross_entropy, 0.1, [metrics])
            with HostReads() as counter:
                learn.fit(2)
            return counter.count

        assert reads(2) == reads(6)


class DeviceMean(Callback):
    """Each pass's mean loss as MetricsCB computed it on one process: RunningMean's float32
    mean on the device."""

    order = 25

    def __init__(self) -> None:
        self.running = RunningMean()
        self.means: list[float] = []

    def before_epoch(self, learn):
        self.running.reset()

    def after_batch(self, learn):
        self.running.add(learn.loss, len(learn.batch[1]))

    def after_epoch(self, learn):
        self.means.append(float(self.running.mean()))


class TestOneProcess:
    def test_the_loss_is_the_float32_mean_on_the_device_exactly(self):
        """On one process the world's sum changes nothing: every pass's loss is, bit for bit,
        the float32 mean of the batch losses weighted by their samples."""
        metrics, device = MetricsCB(), DeviceMean()
        Learner(mlp(), batches_dls(5, 3, 24), F.cross_entropy, 0.5, [metrics, device]).fit(4)
        reported = [row[f"{p}_loss"] for row in metrics.history for p in ("train", "valid")]
        assert reported == device.means
        assert len(set(reported)) == 8


class TestNames:
    def test_names_derive_from_the_class(self):
        """The task prefix goes and the rest becomes lower snake case."""
        metrics = MetricsCB(MulticlassAccuracy(10), MulticlassF1Score(10), MeanSquaredError())
        assert list(metrics.metrics) == ["accuracy", "f1_score", "mean_squared_error"]

    def test_two_metrics_with_one_name_are_rejected(self):
        """Two accuracies need names of their own; the message says how."""
        with pytest.raises(ConfigurationError, match=r"two metrics are named 'accuracy'"):
            MetricsCB(MulticlassAccuracy(10), MulticlassAccuracy(10, average="micro"))

    @pytest.mark.parametrize("name", ["loss", "Accuracy", "valid accuracy"])
    def test_bad_names_are_rejected(self, name):
        """'loss' is MetricsCB's own; names are lower_snake_case identifiers."""
        with pytest.raises(ConfigurationError, match="invalid metric name"):
            MetricsCB(**{name: MulticlassAccuracy(10)})

    def test_a_non_metric_is_rejected(self):
        """A function is not a torchmetrics Metric: the message says what would be."""
        with pytest.raises(ConfigurationError, match=r"must be a torchmetrics\.Metric instance"):
            MetricsCB(acc=F.cross_entropy)  # type: ignore[arg-type]

    def test_a_vector_metric_fails_at_pass_end(self):
        """average=None computes one value per class: MetricsCB asks for a scalar."""
        metrics = MetricsCB(MulticlassAccuracy(10, average="none"))
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [metrics])
        with pytest.raises(ConfigurationError, match=r"computed \[10\], not a scalar"):
            learn.fit(1)
        assert learn.state == "idle"


class TestAnyBatch:
    @pytest.mark.parametrize(
        ("model", "loss_func"),
        [(KeywordMLP, F.cross_entropy), (SelfLossMLP, None)],
        ids=["mapping-batches", "model-computes-its-loss"],
    )
    def test_mapping_batches_give_the_values_of_tuple_batches(self, model, loss_func):
        """Mapping batches, with a loss_func or with the model's own loss and logits, give
        the values the same data gives as (x, y) tuples, and a hand computation's."""
        dls = batches_dls(6, 4)
        plain = metrics_cb()
        reference = Learner(mlp(), dls, F.cross_entropy, 0.5, [plain], audit_log=None)
        reference.fit(2)
        mapped = metrics_cb()
        learn = Learner(model(), as_mappings(dls), loss_func, 0.5, [mapped], audit_log=None)
        learn.fit(2)
        assert list(mapped.values) == mapped.names()
        assert mapped.values == pytest.approx(plain.values, rel=1e-5)
        hand = hand_evaluation(reference.model, dls.valid)
        assert mapped.values["valid_loss"] == pytest.approx(hand["loss"], rel=1e-5)
        assert mapped.values["valid_accuracy"] == pytest.approx(hand["accuracy"], abs=1e-6)
        assert mapped.values["valid_macro"] == pytest.approx(hand["macro"], abs=1e-6)

    def test_batches_without_a_target_add_to_the_loss_only(self):
        """An autoencoder's batches are inputs alone: the loss is averaged, metrics are NaN."""

        class AutoEncoder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.net = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 64))

            def forward(self, x):
                out = self.net(x)
                return {"loss": F.mse_loss(out, x), "logits": out}

        train, valid = batches_dls(4, 3).train, batches_dls(4, 3).valid
        dls = DataLoaders([x for x, _ in train], [x for x, _ in valid])
        metrics = MetricsCB(mse=MeanSquaredError())
        learn = Learner(AutoEncoder(), dls, None, 0.5, [metrics])
        learn.fit(1)
        with torch.no_grad():
            hand = sum(F.mse_loss(learn.model(x)["logits"], x).item() for x in dls.valid) / 3
        assert metrics.values["valid_loss"] == pytest.approx(hand, rel=1e-5)
        assert math.isnan(metrics.values["valid_mse"])
        assert math.isnan(metrics.values["train_mse"])


class TestOtherRuns:
    def test_validate_returns_the_pass_values_and_keeps_the_fit_s(self):
        """validate() returns the loss and metrics of its pass by bare name, equal to a hand
        computation; values and history stay the fit's; the run's log has its note."""
        metrics = metrics_cb()
        dls = batches_dls(6, 4)
        learn = Learner(mlp(), dls, F.cross_entropy, 0.5, [metrics])
        learn.fit(2)
        values, history = dict(metrics.values), [dict(row) for row in metrics.history]
        other = batches_dls(6, 0).train  # the training digits: different values
        result = learn.validate(other)
        hand = hand_evaluation(learn.model, other)
        assert set(result) == {"loss", "accuracy", "macro"}
        assert result["loss"] == pytest.approx(hand["loss"], rel=1e-5)
        assert result["accuracy"] == pytest.approx(hand["accuracy"], abs=1e-6)
        assert result["macro"] == pytest.approx(hand["macro"], abs=1e-6)
        assert result["accuracy"] != values["valid_accuracy"]
        assert metrics.last_pass() == pytest.approx(result, rel=1e-5)
        assert metrics.values == values
        assert metrics.history == history
        (note,) = metric_notes(learn.audit_path)
        assert (note["batches"], note["complete"]) == (6, True)
        assert note["valid_accuracy"] == result["accuracy"]

    def test_validate_before_any_fit(self):
        """A validate run has no before_fit: the metrics are placed and reset per pass."""
        metrics = metrics_cb()
        learn = Learner(mlp(), batches_dls(1, 4), F.cross_entropy, 0.5, [metrics])
        first, second = learn.validate(), learn.validate()
        hand = hand_evaluation(learn.model, learn.dls.valid)
        assert first == second
        assert first["accuracy"] == pytest.approx(hand["accuracy"], abs=1e-6)
        assert (metrics.values, metrics.history) == ({}, [])

    def test_a_predict_run_changes_nothing(self):
        """get_preds computes no loss: MetricsCB neither updates nor notes anything."""
        metrics = metrics_cb()
        learn = Learner(mlp(), batches_dls(2, 4), F.cross_entropy, 0.5, [metrics])
        learn.fit(1)
        before = (dict(metrics.values), list(metrics.history), metrics.last_pass())
        preds, targets = learn.get_preds()
        assert preds.shape == (32, 10)
        assert targets is not None
        assert (metrics.values, metrics.history, metrics.last_pass()) == before
        assert metric_notes(learn.audit_path) == []


class TestRunningMean:
    def test_weighted_mean_and_empty(self):
        """Values are weighted by their counts; nothing added gives NaN."""
        mean = RunningMean()
        assert torch.isnan(mean.mean())
        mean.add(torch.tensor(1.0), 3)
        mean.add(torch.tensor(3.0), 1)
        assert mean.mean().item() == pytest.approx(1.5)
        assert mean.count == 4

    def test_a_loss_that_is_not_scalar_is_rejected(self):
        """reduction='none' gives a vector: the message says to use a mean."""
        with pytest.raises(ConfigurationError, match="reduction='mean'"):
            RunningMean().add(torch.ones(4), 4)


def two_metrics() -> MetricsCB:
    return MetricsCB(MulticlassAccuracy(num_classes=10), f1=MulticlassF1Score(num_classes=10))


def metrics_learner(cb_factory=two_metrics) -> Learner:
    return Learner(mlp(), batches_dls(4, 3), F.cross_entropy, 0.1, [cb_factory()], audit_log=None)


RESUMES = {
    "mid-training": (0, True, 2),
    "second-epoch": (1, True, 1),
    "end-of-training": (0, True, 4),
    "mid-validation": (0, False, 1),
    "between-passes": (0, False, 0),
    "between-epochs": (1, True, 0),
}


measured = checkpointed_fixture(metrics_learner, 2, RESUMES.values())


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_ends_with_the_same_values_and_history(self, measured, at):
        """Mid training pass, mid validation pass or between passes: the same numbers."""
        ref_learn, files = measured
        ref = callback_of(ref_learn, MetricsCB)
        cb = callback_of(resumed_fit(metrics_learner, 2, files[at]), MetricsCB)
        assert cb.history == ref.history
        assert cb.values == ref.values
        assert cb.last_pass() == ref.last_pass()
        assert len(cb.history) == 2
        assert all(0 < row["valid_accuracy"] <= 1 for row in cb.history)

    def test_mid_pass_the_state_holds_the_running_sums(self, measured):
        """After two batches of a training pass: 16 samples, and the metrics' states."""
        state = saved_state(measured[1][0, True, 2], "MetricsCB")
        assert (state["pass_state"], state["training"], state["batches"]) == ("open", True, 2)
        assert state["loss"]["count"] == 16
        assert state["loss"]["sum"].ndim == 0
        assert set(state["metrics"]) == {"accuracy", "f1"}
        assert state["metrics"]["accuracy"]["updates"] == 2

    def test_other_metrics_are_refused_mid_pass(self, measured):
        """A checkpoint of accuracy and f1 cannot resume a callback with accuracy alone."""
        accuracy = lambda: MetricsCB(MulticlassAccuracy(num_classes=10))
        with pytest.raises(
            CheckpointError,
            match=r"the checkpoint has metrics \['accuracy', 'f1'\], this callback \['accuracy'\]",
        ):
            resumed_fit(partial(metrics_learner, accuracy), 2, measured[1][0, True, 2])

    def test_a_state_lacking_keys_is_refused(self):
        """A CheckpointError names the callback and what is missing."""
        with pytest.raises(CheckpointError, match=r"MetricsCB: the state to load lacks metrics"):
            two_metrics().load_state_dict(
                dict.fromkeys(
                    (
                        "values",
                        "history",
                        "last_pass",
                        "epoch",
                        "pass_state",
                        "training",
                        "batches",
                        "updates",
                        "loss",
                    )
                )
            )

    def test_a_wrong_type_is_refused(self):
        """A pass state that is not one of the three is named."""
        state = two_metrics().state_dict()
        unknown = "halfway"
        state["pass_state"] = unknown
        with pytest.raises(
            CheckpointError,
            match=(
                r"state\['pass_state'\] must be one of \['unseen', 'open',"
                r" 'finished'\], got 'halfway'"
            ),
        ):
            two_metrics().load_state_dict(state)
