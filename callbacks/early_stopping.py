"""EarlyStoppingCB: end the fit when a monitored metric stops improving.

It watches one value of the learner's metrics callback through ``callbacks.monitor.Monitor``
(the same tracking SaveModelCB uses) and ends the fit through ``CancelFitException`` when
that value has not improved for more than ``patience`` epochs, after writing a note that
says why into the audit log (the run's status is then ``cancelled``). Validate and predict
runs are not epochs of a fit: it ignores them.

No per-batch work, hence no per-batch host-device sync: the provider converts its values
to floats once per pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from callbacks._checks import check_count
from callbacks.monitor import Mode, Monitor
from fsm_learner import Callback, CancelFitException
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from fsm_learner import Learner

__all__ = ["EarlyStoppingCB"]


class EarlyStoppingCB(Callback):
    """End the fit when ``monitor`` has not improved for more than ``patience`` epochs.

    An epoch improves when its value beats the best so far by more than ``min_delta``
    (lower for ``mode="min"``, higher for ``"max"``; ``"auto"`` picks ``min`` for names
    containing "loss" or "error"). The check runs at the end of each validation pass; with
    ``patience=0`` the first epoch that does not improve stops the fit. The stop is a
    ``CancelFitException`` raised in ``after_epoch``, preceded by an ``early_stopping``
    note in the audit log.
    """

    order = 50

    def __init__(
        self,
        monitor: str = "valid_loss",
        *,
        mode: Mode = "auto",
        patience: int = 1,
        min_delta: float = 0.0,
    ) -> None:
        """Check the settings; the metrics provider is looked up when the fit starts."""
        self.monitor = Monitor(monitor, mode, min_delta)
        self.patience = check_count(
            "patience", patience, minimum=0, meaning="epochs without improvement"
        )
        self.wait = 0
        self.stopped_epoch: int | None = None

    def before_fit(self, learn: Learner) -> None:
        """Find the metrics provider and start counting afresh."""
        self.monitor.bind(learn, type(self).__name__)
        self.wait = 0
        self.stopped_epoch = None

    def after_epoch(self, learn: Learner) -> None:
        """Capture the monitored value; after the validation pass, decide whether to stop."""
        if learn.kind is not RunKind.FIT:
            return
        self.monitor.capture()
        if learn.training:
            return
        if self.monitor.update(learn.epoch):
            self.wait = 0
            return
        self.wait += 1
        if self.wait > self.patience:
            self._stop(learn)

    def _stop(self, learn: Learner) -> None:
        monitor = self.monitor
        self.stopped_epoch = learn.epoch
        learn.note(
            "early_stopping",
            monitor=monitor.name,
            mode=monitor.mode,
            value=monitor.latest,
            best=monitor.best,
            best_epoch=monitor.best_epoch,
            patience=self.patience,
            min_delta=monitor.min_delta,
        )
        msg = (
            f"{monitor.name} did not improve on {monitor.best:.6g} (epoch {monitor.best_epoch}) "
            f"for {self.wait} epochs"
        )
        raise CancelFitException(msg)
