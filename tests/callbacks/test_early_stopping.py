"""EarlyStoppingCB: stops at the epoch its rule names, on a real model, through cancel_fit."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    batches_dls,
    callback_of,
    checkpointed_fixture,
    mlp,
    resumed_fit,
    saved_state,
)

from callbacks.early_stopping import EarlyStoppingCB
from callbacks.metrics import MetricsCB
from fsm_learner import Callback, ConfigurationError, Learner, RunStatus
from fsm_learner.audit.replay import audit_file
from fsm_learner.callback import MetricsProvider
from fsm_learner.exceptions import CheckpointError

N_EPOCHS = 12
LR = 1.0  # high enough that the validation loss goes up and down on 32 training digits


class PassMetrics(Callback):
    """A stand-in metrics provider: mean loss and accuracy per pass, one sync per pass."""

    order = 20

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] = {}

    def names(self) -> list[str]:
        return [f"{p}_{m}" for p in ("train", "valid") for m in ("loss", "accuracy")]

    def last_pass(self) -> dict[str, float]:
        return self.last

    def before_epoch(self, learn):
        self._loss, self._correct, self._n = torch.zeros(()), torch.zeros(()), 0

    def after_batch(self, learn):
        y = learn.batch[1]
        self._loss += learn.loss.detach() * len(y)
        self._correct += (learn.preds.argmax(1) == y).sum()
        self._n += len(y)

    def after_epoch(self, learn):
        prefix = "train" if learn.training else "valid"
        self.last = {
            "loss": float(self._loss / self._n),
            "accuracy": float(self._correct / self._n),
        }
        if learn.kind != "fit":
            return
        self.values.update((f"{prefix}_{name}", value) for name, value in self.last.items())
        if not learn.training:
            self.history.append(dict(self.values))


def notes(path: Path | None, name: str) -> list[dict[str, object]]:
    assert path is not None
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [r for r in records if r["ev"] == "note" and r["name"] == name]


def reference_history() -> list[dict[str, float]]:
    """Every epoch's values of an uninterrupted fit, from the same seed and data."""
    metrics = PassMetrics()
    Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, [metrics], audit_log=None).fit(N_EPOCHS)
    return metrics.history


def expected_stop(values: list[float], *, lower: bool, patience: int, min_delta: float):
    """The rule, written out plainly: (epoch the fit must stop at or None, best, best epoch)."""
    best, best_epoch, wait = math.nan, -1, 0
    for epoch, value in enumerate(values):
        if best_epoch < 0 or (value < best - min_delta if lower else value > best + min_delta):
            best, best_epoch, wait = value, epoch, 0
            continue
        wait += 1
        if wait > patience:
            return epoch, best, best_epoch
    return None, best, best_epoch


def fit_with(cb: EarlyStoppingCB):
    learn = Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, [PassMetrics(), cb])
    return learn, learn.fit(N_EPOCHS)


class TestStopsAtTheRightEpoch:
    @pytest.mark.parametrize(
        ("monitor", "patience", "min_delta"),
        [
            ("valid_loss", 0, 0.0),
            ("valid_loss", 1, 0.0),
            ("valid_loss", 1, 0.1),
            ("valid_accuracy", 1, 0.0),
            ("train_loss", 0, 0.0),
        ],
    )
    def test_stop_epoch_matches_the_rule(self, monitor, patience, min_delta):
        """The fit ends at the epoch the rule names on the uninterrupted history, or runs out."""
        history = [h[monitor] for h in reference_history()]
        lower = "loss" in monitor
        stop, best, best_epoch = expected_stop(
            history, lower=lower, patience=patience, min_delta=min_delta
        )
        cb = EarlyStoppingCB(monitor, patience=patience, min_delta=min_delta)
        _, result = fit_with(cb)
        assert cb.stopped_epoch == stop
        report = audit_file(result.audit_path)[0][0]
        if stop is None:
            assert result.status is RunStatus.COMPLETED
            assert report.epochs == N_EPOCHS
            return
        assert result.status is RunStatus.CANCELLED
        assert report.status is RunStatus.CANCELLED
        assert report.cancels["cancel_fit"] == 1
        assert report.epochs == stop + 1
        (note,) = notes(result.audit_path, "early_stopping")
        assert (note["best"], note["best_epoch"]) == (best, best_epoch)
        assert note["value"] == history[stop]
        assert note["monitor"] == monitor
        assert note["mode"] == ("min" if lower else "max")
        assert (note["ep"], note["tr"]) == (stop, False)

    def test_this_data_stops_early_at_least_once(self):
        """The parameters above are not vacuous: patience 0 stops before the last epoch."""
        history = [h["valid_loss"] for h in reference_history()]
        stop, _, _ = expected_stop(history, lower=True, patience=0, min_delta=0.0)
        assert stop is not None
        assert stop < N_EPOCHS - 1

    def test_a_second_fit_starts_afresh(self):
        """Best value and waiting count are reset by before_fit."""
        cb = EarlyStoppingCB(patience=0)
        learn, _ = fit_with(cb)
        first = cb.stopped_epoch
        learn.model.load_state_dict(mlp().state_dict())
        learn.fit(N_EPOCHS)
        assert cb.stopped_epoch == first


class TestOtherRuns:
    def test_a_validate_run_neither_counts_nor_stops(self):
        """validate() after a fit is no epoch: the waiting count and the best are untouched,
        whether its value would improve on the best (the training digits) or not."""
        metrics = PassMetrics()
        cb = EarlyStoppingCB(patience=5)
        learn = Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, [metrics, cb])
        learn.fit(3)
        state = (cb.wait, cb.monitor.best, cb.monitor.best_epoch, cb.stopped_epoch)
        fitted_on = batches_dls(4, 0).train  # a lower loss than any validation pass
        assert isinstance(metrics, MetricsProvider)
        for dl in (None, fitted_on):
            result = learn.validate(dl)
            assert (result["loss"] < cb.monitor.best - 1e-3) is (dl is fitted_on)
            assert result["loss"] == pytest.approx(metrics.last["loss"], rel=1e-6)
            assert (cb.wait, cb.monitor.best, cb.monitor.best_epoch, cb.stopped_epoch) == state
            assert notes(learn.audit_path, "early_stopping") == []
        assert learn.get_preds()[0].shape == (32, 10)


class TestConfiguration:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"patience": -1}, "patience must be an int >= 0.*got -1"),
            ({"patience": 1.5}, "patience must be an int >= 0.*got 1.5"),
            ({"min_delta": -0.1}, "min_delta must be a finite number >= 0, got -0.1"),
            ({"min_delta": math.inf}, "min_delta must be a finite number >= 0, got inf"),
            ({"mode": "lowest"}, "mode must be one of 'auto', 'min', 'max', got 'lowest'"),
            ({"monitor": ""}, "monitor must be a metric name"),
        ],
    )
    def test_bad_settings(self, kwargs, match):
        """Each bad setting is named with what was received."""
        with pytest.raises(ConfigurationError, match=match):
            EarlyStoppingCB(**kwargs)

    def test_unknown_monitor_lists_the_valid_names(self):
        """Checked when the fit starts, against the provider's names."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [PassMetrics()])
        learn.cbs.append(EarlyStoppingCB("valid_acc"))
        with pytest.raises(ConfigurationError) as info:
            learn.fit(1)
        assert "unknown monitor 'valid_acc'" in str(info.value)
        assert "'valid_accuracy'" in str(info.value)
        assert learn.state == "idle"

    def test_no_metrics_provider(self):
        """Without a metrics callback the fit fails at its start, saying what to add."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [EarlyStoppingCB()])
        with pytest.raises(ConfigurationError, match="needs a metrics callback"):
            learn.fit(1)


class TestWithMetricsCB:
    def test_monitors_a_torchmetrics_metric_of_the_stock_metrics_callback(self):
        """MetricsCB meets the provider protocol: stop where its own history says."""
        from torchmetrics.classification import MulticlassAccuracy

        from callbacks.metrics import MetricsCB

        def learner(cbs):
            metrics = MetricsCB(MulticlassAccuracy(num_classes=10))
            return metrics, Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, [metrics, *cbs])

        metrics, learn = learner([])
        learn.fit(N_EPOCHS)
        history = [row["valid_accuracy"] for row in metrics.history]
        stop, best, best_epoch = expected_stop(history, lower=False, patience=1, min_delta=0.0)
        assert stop is not None
        cb = EarlyStoppingCB("valid_accuracy", patience=1)
        _, learn = learner([cb])
        result = learn.fit(N_EPOCHS)
        assert cb.stopped_epoch == stop
        assert (cb.monitor.best, cb.monitor.best_epoch) == (best, best_epoch)
        assert result.status is RunStatus.CANCELLED

    def test_train_metrics_are_seen_at_the_end_of_the_epoch(self):
        """MetricsCB starts new values each epoch; train_loss is still there after validation."""
        from callbacks.metrics import MetricsCB

        metrics = MetricsCB()
        cb = EarlyStoppingCB("train_loss", patience=100)
        Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [metrics, cb]).fit(3)
        assert cb.monitor.best == min(row["train_loss"] for row in metrics.history)


def stopping(patience: int = 2) -> EarlyStoppingCB:
    # mode="max" on a falling loss: every epoch after the first fails to improve
    return EarlyStoppingCB("valid_loss", mode="max", patience=patience)


def stopping_learner() -> Learner:
    cbs = [MetricsCB(), stopping()]  # MetricsCB keeps its running sums in checkpoints
    return Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, cbs, audit_log=None)


RESUMES = {
    "between-epochs": (2, True, 0),
    "mid-training": (3, True, 2),
    "mid-validation": (2, False, 3),
    "before-validation": (1, False, 0),
}


stopped = checkpointed_fixture(stopping_learner, 6, RESUMES.values())


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_stops_at_the_same_epoch(self, stopped, at):
        """Waiting since epoch 0, it stops at epoch 3 wherever the fit was resumed."""
        ref_learn, files = stopped
        ref = callback_of(ref_learn, EarlyStoppingCB)
        learn = resumed_fit(stopping_learner, 6, files[at])
        cb = callback_of(learn, EarlyStoppingCB)
        assert ref.stopped_epoch == 3
        assert (cb.stopped_epoch, cb.wait) == (3, 3)
        assert (cb.monitor.best, cb.monitor.best_epoch) == (ref.monitor.best, 0)
        assert learn.last_result.status is RunStatus.CANCELLED
        assert learn.epoch == ref_learn.epoch == 3

    def test_the_checkpoint_holds_the_wait_and_the_best(self, stopped):
        """After epoch 1: one epoch without improvement since the best, epoch 0."""
        state = saved_state(stopped[1][2, True, 0], "EarlyStoppingCB")
        assert (state["wait"], state["monitor"]["best_epoch"]) == (1, 0)

    def test_another_monitor_s_state_is_refused(self):
        """A checkpoint of valid_loss cannot resume a callback watching valid_accuracy."""
        state = stopping().state_dict()
        with pytest.raises(
            CheckpointError,
            match=(
                r"EarlyStoppingCB: the checkpoint monitors 'valid_loss' \(mode 'max'\),"
                r" this callback monitors 'valid_accuracy'"
            ),
        ):
            EarlyStoppingCB("valid_accuracy").load_state_dict(state)

    def test_a_wrong_type_is_refused(self):
        """A wait that is not an int is named with what was received."""
        state = {**stopping().state_dict(), "wait": 1.5}
        with pytest.raises(
            CheckpointError,
            match=(
                r"EarlyStoppingCB: state\['wait'\] must be an int \(epochs without"
                r" improvement\), got 1.5 of type float"
            ),
        ):
            stopping().load_state_dict(state)
