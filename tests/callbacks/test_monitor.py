"""metrics_of and Monitor: the one way callbacks find a metric, check its name, track its best."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp
from torchmetrics.classification import MulticlassAccuracy

from callbacks.metrics import MetricsCB
from callbacks.monitor import Monitor, is_improvement, metrics_of
from fsm_learner import Callback, ConfigurationError, Learner
from fsm_learner.exceptions import CheckpointError


class ValuesOnly(Callback):
    """Has values and names() but no last_pass(): not a metrics provider any more."""

    def __init__(self):
        self.values: dict[str, float] = {}

    def names(self) -> list[str]:
        return ["valid_loss"]


def metrics_cb() -> MetricsCB:
    return MetricsCB(MulticlassAccuracy(num_classes=10, average="micro"))


class TestMetricsOf:
    def test_finds_the_first_provider(self):
        """The first callback meeting fsm_learner's MetricsProvider, whatever its order."""
        first, second = metrics_cb(), metrics_cb()
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [first, second])
        assert metrics_of(learn) is first

    def test_none_without_a_provider(self):
        """A callback without last_pass() is not one: the protocol is the core's."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [ValuesOnly()])
        assert metrics_of(learn) is None


class TestBind:
    def test_binds_tracks_and_forgets_past_fits(self):
        """Captured at each pass end, updated per epoch: best equals the history's minimum."""
        metrics, monitor = metrics_cb(), Monitor("valid_loss")

        class Watch(Callback):
            order = 30

            def before_fit(self, learn):
                monitor.bind(learn, "Watch")

            def after_epoch(self, learn):
                monitor.capture()
                if not learn.training:
                    monitor.update(learn.epoch)

        learn = Learner(mlp(), batches_dls(4, 4), F.cross_entropy, 1.0, [metrics, Watch()])
        learn.fit(5)
        losses = [row["valid_loss"] for row in metrics.history]
        assert monitor.provider is metrics
        assert monitor.best == min(losses)
        assert monitor.best_epoch == losses.index(min(losses))
        assert monitor.latest == losses[-1]
        learn.fit(1)
        assert monitor.best_epoch == 0
        assert monitor.best == metrics.history[0]["valid_loss"]

    def test_unknown_monitor_names_a_close_match_and_every_valid_name(self):
        """The message names who asks, what it received, a close match and the valid names."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [metrics_cb()])
        with pytest.raises(ConfigurationError) as info:
            Monitor("valid_acuracy").bind(learn, "SaveModelCB")
        assert str(info.value) == (
            "SaveModelCB: unknown monitor 'valid_acuracy'; did you mean 'valid_accuracy'? "
            "MetricsCB provides 'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy'"
        )

    def test_no_provider_names_the_callbacks_there_are(self):
        """Without a metrics callback the message says what to add and what there is."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [ValuesOnly()])
        with pytest.raises(ConfigurationError) as info:
            Monitor("valid_loss").bind(learn, "EarlyStoppingCB")
        message = str(info.value)
        assert message.startswith("EarlyStoppingCB needs a metrics callback among learn.cbs")
        assert ".last_pass()" in message
        assert message.endswith("got callbacks: ValuesOnly")


class TestImprovement:
    def test_min_max_delta_and_nan(self):
        """Beats the best by more than min_delta; NaN never improves; anything beats NaN."""
        assert is_improvement(0.9, 1.0, "min", 0.0)
        assert not is_improvement(0.95, 1.0, "min", 0.05)
        assert is_improvement(1.1, 1.0, "max", 0.05)
        assert not is_improvement(1.0, 1.0, "max", 0.0)
        assert is_improvement(5.0, math.nan, "min", 0.0)
        assert not is_improvement(math.nan, 1.0, "min", 0.0)

    @pytest.mark.parametrize(
        ("name", "mode"),
        [("valid_loss", "min"), ("train_error", "min"), ("valid_accuracy", "max")],
    )
    def test_auto_mode(self, name, mode):
        """auto: lower is better for losses and errors, higher for anything else."""
        assert Monitor(name).mode == mode

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"min_delta": -0.1}, "min_delta must be a finite number >= 0, got -0.1"),
            ({"min_delta": True}, "min_delta must be a finite number >= 0, got True"),
            ({"mode": "lowest"}, "mode must be one of 'auto', 'min', 'max', got 'lowest'"),
            ({"name": ""}, "monitor must be a metric name"),
        ],
    )
    def test_bad_settings(self, kwargs, match):
        """Each bad setting is named with what was received."""
        with pytest.raises(ConfigurationError, match=match):
            Monitor(**{"name": "valid_loss", **kwargs})


class TestState:
    def test_the_values_come_back_after_a_weights_only_round_trip(self, tmp_path):
        """Latest, best and best epoch, NaN included."""
        monitor = Monitor("valid_loss")
        monitor.latest, monitor.best, monitor.best_epoch = 0.5, 0.25, 3
        torch.save(monitor.state_dict(), tmp_path / "m.pt")
        fresh = Monitor("valid_loss")
        fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), "Owner")
        assert (fresh.latest, fresh.best, fresh.best_epoch) == (0.5, 0.25, 3)

    def test_another_mode_is_refused(self):
        """The same name watched the other way round is another monitor."""
        state = Monitor("valid_loss").state_dict()
        with pytest.raises(
            CheckpointError,
            match=(
                r"Owner: the checkpoint monitors 'valid_loss' \(mode 'min'\), this"
                r" callback monitors 'valid_loss' \(mode 'max'\)"
            ),
        ):
            Monitor("valid_loss", mode="max").load_state_dict(state, "Owner")
