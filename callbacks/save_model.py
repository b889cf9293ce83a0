"""SaveModelCB, and ``load_checkpoint`` that reads what it writes.

A checkpoint is ``{"model": model.state_dict(), "opt": opt.state_dict(), "epoch": n}``
written with ``torch.save`` (to a temporary file, then renamed over the target, so a
crash never leaves half a checkpoint), read back with ``torch.load(weights_only=True)``.

When it saves, at the end of each validation pass:

- ``monitor=None, every_epoch=False``: every epoch, over the same file (the latest);
- ``monitor="valid_loss"`` (any name the metrics callback provides): only when the
  monitored value improved (the best), over the same file;
- ``every_epoch=True``: every epoch, into ``<dir>/epoch_<n>.pt``.

Each save adds a ``checkpoint`` note to the audit log. Validate and predict runs are not
epochs of a fit: nothing is saved in them. No per-batch work, so no per-batch host-device
sync. SaveModelCB runs after EarlyStoppingCB (order 60 > 50): when early
stopping ends the fit in an ``after_epoch``, that epoch is not saved; with the same
monitor, that epoch did not improve anyway.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from callbacks.monitor import Mode, Monitor
from fsm_learner import Callback, ConfigurationError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from torch import nn

    from fsm_learner import Learner

__all__ = ["SaveModelCB", "load_checkpoint"]


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    opt: torch.optim.Optimizer | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> int:
    """Load a SaveModelCB checkpoint into ``model`` (and ``opt``); return its epoch.

    The file is read with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers. The tensors are first loaded onto ``map_location``;
    ``load_state_dict`` then copies them to wherever the model's parameters live.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    missing = {"model", "opt", "epoch"} - set(checkpoint)
    if missing:
        msg = (
            f"{os.fspath(path)} is not a SaveModelCB checkpoint: it lacks {sorted(missing)} "
            f"(expected keys 'model', 'opt', 'epoch'; got {sorted(checkpoint)})"
        )
        raise ConfigurationError(msg)
    model.load_state_dict(checkpoint["model"])
    if opt is not None:
        opt.load_state_dict(checkpoint["opt"])
    return int(checkpoint["epoch"])


def _check_path(path: object) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        msg = f"path must be a file path (or a directory with every_epoch=True), got {path!r}"
        raise ConfigurationError(msg)
    return Path(path)


class SaveModelCB(Callback):
    """Save the model and optimizer at the end of epochs: the best, the latest, or every one.

    ``path`` is the checkpoint file, or the directory of ``epoch_<n>.pt`` files when
    ``every_epoch=True``. With ``monitor`` (a name of the metrics callback such as
    ``"valid_loss"``), only epochs that improve on the best so far by more than
    ``min_delta`` are saved (``mode`` as in EarlyStoppingCB). ``saved`` lists the files
    the last fit wrote, each once, in the order first written; ``best`` and ``best_epoch``
    are the monitored value's best so far and its epoch (None without ``monitor``).
    """

    order = 60

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        monitor: str | None = None,
        mode: Mode = "auto",
        min_delta: float = 0.0,
        every_epoch: bool = False,
    ) -> None:
        """Check the settings; the metrics provider is looked up when the fit starts."""
        self.path = _check_path(path)
        if monitor is not None and every_epoch:
            msg = (
                f"SaveModelCB saves the best epoch (monitor={monitor!r}) or every epoch "
                "(every_epoch=True), not both: drop one"
            )
            raise ConfigurationError(msg)
        self.monitor = None if monitor is None else Monitor(monitor, mode, min_delta)
        self.every_epoch = every_epoch
        self.saved: list[Path] = []

    @property
    def best(self) -> float | None:
        """The best monitored value of the last fit (NaN before one); None without monitor."""
        return None if self.monitor is None else self.monitor.best

    @property
    def best_epoch(self) -> int | None:
        """The epoch of ``best`` (-1 before one); None without monitor."""
        return None if self.monitor is None else self.monitor.best_epoch

    def before_fit(self, learn: Learner) -> None:
        """Find the metrics provider when monitoring; forget the files of past fits."""
        if self.monitor is not None:
            self.monitor.bind(learn, type(self).__name__)
        self.saved = []

    def after_epoch(self, learn: Learner) -> None:
        """At the end of the validation pass, save when this epoch is to be kept."""
        if learn.kind is not RunKind.FIT:
            return
        monitor = self.monitor
        if monitor is not None:
            monitor.capture()
        if learn.training:
            return
        if monitor is None or monitor.update(learn.epoch):
            self._save(learn)

    def checkpoint_path(self, epoch: int) -> Path:
        """Where the checkpoint of ``epoch`` goes."""
        return self.path / f"epoch_{epoch}.pt" if self.every_epoch else self.path

    def _save(self, learn: Learner) -> None:
        target = self.checkpoint_path(learn.epoch)
        opt = learn.opt
        checkpoint: dict[str, Any] = {
            "model": learn.model.state_dict(),
            "opt": {} if opt is None else opt.state_dict(),
            "epoch": learn.epoch,
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        torch.save(checkpoint, partial)
        partial.replace(target)
        if target not in self.saved:
            self.saved.append(target)
        fields: dict[str, Any] = {"path": str(target)}
        if self.monitor is not None:
            fields.update(monitor=self.monitor.name, value=self.monitor.best)
        learn.note("checkpoint", **fields)
