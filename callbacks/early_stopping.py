"""EarlyStoppingCB, and the monitored-metric tracking that SaveModelCB shares.

This module owns:

- ``MetricsProvider``: the small protocol a metrics callback meets so that other callbacks
  can monitor its values: a ``values`` mapping (name to float, refreshed at the end of
  each pass, e.g. ``"valid_loss"``) and a ``names()`` method listing the names it will
  produce. ``callbacks.metrics.MetricsCB`` meets it; so can any user callback.
- ``Monitor``: tracks one monitored value across epochs (mode, ``min_delta``, the best
  value and its epoch). It captures the value at the end of every pass where the
  provider has it, so ``train_*`` and ``valid_*`` names both work whether the provider
  keeps or resets its values between passes; decisions are taken once per epoch, at the
  end of the validation pass.
- ``EarlyStoppingCB``: ends the fit through ``CancelFitException`` when the monitored
  value has not improved for more than ``patience`` epochs, after writing a note that
  says why into the audit log (the run's status is then ``cancelled``).

No per-batch work, hence no per-batch host-device sync: the provider converts its values
to floats once per pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final, Literal, Protocol, runtime_checkable

from fsm_learner import Callback, CancelFitException, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner

__all__ = [
    "EarlyStoppingCB",
    "MetricsProvider",
    "Mode",
    "Monitor",
    "find_provider",
    "is_improvement",
]

Mode = Literal["auto", "min", "max"]
"""``min``: lower is better; ``max``: higher is better; ``auto``: ``min`` for losses."""

_MODES: Final = ("auto", "min", "max")
_LOWER_IS_BETTER: Final = ("loss", "error")


@runtime_checkable
class MetricsProvider(Protocol):
    """What a callback offers for others to monitor: refreshed values and their names."""

    @property
    def values(self) -> Mapping[str, float]:
        """The latest value of each metric, refreshed at the end of each pass."""
        ...  # pragma: no cover (protocol)

    def names(self) -> list[str]:
        """Every name ``values`` will hold once the passes have run."""
        ...  # pragma: no cover (protocol)


def find_provider(learn: Learner, owner: str) -> MetricsProvider:
    """Return the first callback of ``learn`` that provides metrics; ``owner`` names who asks."""
    for cb in learn.cbs:
        if isinstance(cb, MetricsProvider):
            return cb
    have = ", ".join(type(cb).__name__ for cb in learn.cbs) or "none"
    msg = (
        f"{owner} needs a metrics callback among learn.cbs (MetricsCB, or any callback with "
        f"a .values mapping and a .names() method); got callbacks: {have}"
    )
    raise ConfigurationError(msg)


def _check_mode(mode: object) -> Mode:
    """Return ``mode`` when it is one of the modes, else raise ConfigurationError."""
    if mode in _MODES:
        return mode
    msg = f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}"
    raise ConfigurationError(msg)


def _check_min_delta(min_delta: object) -> float:
    """Return ``min_delta`` as a float when it is a finite number >= 0."""
    if (
        isinstance(min_delta, bool)
        or not isinstance(min_delta, int | float)
        or not math.isfinite(min_delta)
        or min_delta < 0
    ):
        msg = f"min_delta must be a finite number >= 0, got {min_delta!r}"
        raise ConfigurationError(msg)
    return float(min_delta)


def _check_monitor(monitor: object) -> str:
    """Return ``monitor`` when it is a non-empty string."""
    if not isinstance(monitor, str) or not monitor:
        msg = f"monitor must be a metric name such as 'valid_loss', got {monitor!r}"
        raise ConfigurationError(msg)
    return monitor


def _resolve_mode(monitor: str, mode: Mode) -> Literal["min", "max"]:
    """Resolve ``auto``: ``min`` when the name says loss or error, ``max`` otherwise."""
    if mode != "auto":
        return mode
    return "min" if any(word in monitor for word in _LOWER_IS_BETTER) else "max"


def is_improvement(
    value: float, best: float, mode: Literal["min", "max"], min_delta: float
) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta``; NaN never improves."""
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class Monitor:
    """One monitored metric across the epochs of a fit: its latest and best values."""

    def __init__(self, name: str, mode: Mode = "auto", min_delta: float = 0.0) -> None:
        """Check the settings; ``bind`` finds the provider when the fit starts."""
        self.name = _check_monitor(name)
        self.mode = _resolve_mode(self.name, _check_mode(mode))
        self.min_delta = _check_min_delta(min_delta)
        self.provider: MetricsProvider | None = None
        self.latest = math.nan
        self.best = math.nan
        self.best_epoch = -1

    def bind(self, learn: Learner, owner: str) -> None:
        """Find the provider, check that it produces the monitored name, forget past fits."""
        provider = find_provider(learn, owner)
        valid = provider.names()
        if self.name not in valid:
            msg = (
                f"{owner}: unknown monitor {self.name!r}; "
                f"{type(provider).__name__} provides {', '.join(map(repr, valid)) or 'nothing'}"
            )
            raise ConfigurationError(msg)
        self.provider = provider
        self.latest = self.best = math.nan
        self.best_epoch = -1

    def capture(self) -> None:
        """Keep the provider's value of the monitored name, if it has one now."""
        if self.provider is not None and self.name in self.provider.values:
            self.latest = float(self.provider.values[self.name])

    def update(self, epoch: int) -> bool:
        """Compare the latest value with the best; record and return whether it improved."""
        if not is_improvement(self.latest, self.best, self.mode, self.min_delta):
            return False
        self.best, self.best_epoch = self.latest, epoch
        return True


def _check_patience(patience: object) -> int:
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        msg = f"patience must be an int >= 0 (epochs without improvement), got {patience!r}"
        raise ConfigurationError(msg)
    return patience


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
        self.patience = _check_patience(patience)
        self.wait = 0
        self.stopped_epoch: int | None = None

    def before_fit(self, learn: Learner) -> None:
        """Find the metrics provider and start counting afresh."""
        self.monitor.bind(learn, type(self).__name__)
        self.wait = 0
        self.stopped_epoch = None

    def after_epoch(self, learn: Learner) -> None:
        """Capture the monitored value; after the validation pass, decide whether to stop."""
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
