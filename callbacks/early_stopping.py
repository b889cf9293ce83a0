"""EarlyStoppingCB: end the fit when a monitored metric stops improving.

It watches one value of the learner's metrics callback through ``callbacks.monitor.Monitor``
(the same tracking SaveModelCB uses) and ends the fit through ``CancelFitException`` when
that value has not improved for more than ``patience`` epochs, after writing a note that
says why into the audit log (the run's status is then ``cancelled``). Validate and predict
runs are not epochs of a fit: it ignores them.

No per-batch work, hence no per-batch host-device sync: the provider converts its values
to floats once per pass.

Checkpoints: ``state_dict()`` holds ``wait``, ``stopped_epoch`` and the monitor's state
(its name and mode, checked on load, and its latest, best and best epoch), so a fit
resumed mid-way stops at the epoch the uninterrupted one would. All of it is per fit:
loaded at idle, it is there to read until the next fit's ``before_fit`` starts afresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from callbacks._checks import check_count
from callbacks._state import state_keys, state_optional, state_value
from callbacks.monitor import Mode, Monitor
from fsm_learner import Callback, CancelFitException
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Mapping

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

    def state_dict(self) -> dict[str, Any]:
        """Return the epochs waited, the stopping epoch and the monitor's values."""
        return {
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what ``state_dict`` returned (after ``before_fit`` when resuming)."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("wait", "stopped_epoch", "monitor"))
        wait = state_value(owner, state, "wait", int, "an int (epochs without improvement)")
        stopped = state_optional(owner, state, "stopped_epoch", int, "an int (an epoch)")
        self.monitor.load_state_dict(state["monitor"], owner)
        self.wait, self.stopped_epoch = wait, stopped

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
