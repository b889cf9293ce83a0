"""Finding a fit's metrics and watching one of them: what EarlyStoppingCB and SaveModelCB share.

This module owns the one way the stock callbacks find metric values:

- ``metrics_of(learn)``: the first callback of the learner that meets
  ``fsm_learner.callback.MetricsProvider`` (``values`` keyed ``<pass>_<name>``,
  ``names()``, ``last_pass()``): ``callbacks.MetricsCB``, or any callback of the user's;
- ``Monitor``: one monitored value across the epochs of a fit (mode, ``min_delta``, the
  best value and its epoch). ``bind`` finds the provider when the fit starts and checks
  that it produces the monitored name; ``capture`` keeps the value at the end of every
  pass where the provider has it, so ``train_*`` and ``valid_*`` names both work whether
  the provider keeps or resets its values between passes; ``update`` decides, once per
  epoch, whether it improved.

No per-batch work: the provider converts its values to floats once per pass.

Checkpoints: ``state_dict()`` holds the monitored name and resolved mode (checked on
load: a checkpoint of another monitor is refused) and the ``latest``, ``best`` and
``best_epoch`` values; the owner callback puts it in its own state.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Any, Final, Literal

from callbacks._checks import check_number
from callbacks._state import state_keys, state_value
from fsm_learner import ConfigurationError
from fsm_learner.callback import MetricsProvider
from fsm_learner.exceptions import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner

__all__ = ["Mode", "Monitor", "is_improvement", "metrics_of"]

Mode = Literal["auto", "min", "max"]
"""``min``: lower is better; ``max``: higher is better; ``auto``: ``min`` for losses."""

_MODES: Final = ("auto", "min", "max")
_LOWER_IS_BETTER: Final = ("loss", "error")


def metrics_of(learn: Learner) -> MetricsProvider | None:
    """Return the first callback of ``learn`` that provides metrics, or None."""
    return next((cb for cb in learn.cbs if isinstance(cb, MetricsProvider)), None)


def _check_mode(mode: object) -> Mode:
    """Return ``mode`` when it is one of the modes, else raise ConfigurationError."""
    if mode in _MODES:
        return mode
    msg = f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}"
    raise ConfigurationError(msg)


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


def _no_provider(learn: Learner, owner: str) -> ConfigurationError:
    have = ", ".join(type(cb).__name__ for cb in learn.cbs) or "none"
    return ConfigurationError(
        f"{owner} needs a metrics callback among learn.cbs (callbacks.MetricsCB, or any "
        f"fsm_learner.MetricsProvider: a .values mapping, .names() and .last_pass()); "
        f"got callbacks: {have}"
    )


def _unknown_monitor(name: str, provider: MetricsProvider, owner: str) -> ConfigurationError:
    valid = provider.names()
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    provides = ", ".join(map(repr, valid)) or "nothing"
    return ConfigurationError(
        f"{owner}: unknown monitor {name!r}; {hint}{type(provider).__name__} provides {provides}"
    )


class Monitor:
    """One monitored metric across the epochs of a fit: its latest and best values."""

    def __init__(self, name: str, mode: Mode = "auto", min_delta: float = 0.0) -> None:
        """Check the settings; ``bind`` finds the provider when the fit starts."""
        self.name = _check_monitor(name)
        self.mode = _resolve_mode(self.name, _check_mode(mode))
        self.min_delta = check_number("min_delta", min_delta)
        self.provider: MetricsProvider | None = None
        self.latest = math.nan
        self.best = math.nan
        self.best_epoch = -1

    def bind(self, learn: Learner, owner: str) -> None:
        """Find the provider, check that it produces the monitored name, forget past fits.

        ``owner`` names the callback that monitors, for the messages.
        """
        provider = metrics_of(learn)
        if provider is None:
            raise _no_provider(learn, owner)
        if self.name not in provider.names():
            raise _unknown_monitor(self.name, provider, owner)
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

    def state_dict(self) -> dict[str, Any]:
        """Return the monitored name and mode, and the latest and best values."""
        return {
            "name": self.name,
            "mode": self.mode,
            "latest": self.latest,
            "best": self.best,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any], owner: str) -> None:
        """Take back what ``state_dict`` returned; ``owner`` names the callback, for messages."""
        state = state_keys(owner, state, ("name", "mode", "latest", "best", "best_epoch"))
        saved = (state["name"], state["mode"])
        if saved != (self.name, self.mode):
            msg = (
                f"{owner}: the checkpoint monitors {saved[0]!r} (mode {saved[1]!r}), this "
                f"callback monitors {self.name!r} (mode {self.mode!r}): resume with the same "
                f"monitor"
            )
            raise CheckpointError(msg)
        latest = state_value(owner, state, "latest", float, "a float (NaN before one)")
        best = state_value(owner, state, "best", float, "a float (NaN before one)")
        best_epoch = state_value(owner, state, "best_epoch", int, "an int (-1 before one)")
        self.latest, self.best, self.best_epoch = latest, best, best_epoch

    def __repr__(self) -> str:
        """Name the metric, the mode and the best value so far."""
        return f"Monitor({self.name!r}, mode={self.mode!r}, best={self.best!r})"
