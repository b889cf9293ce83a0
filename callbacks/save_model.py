"""SaveModelCB, and ``load_checkpoint`` that reads what it writes.

A checkpoint is ``{"model": model.state_dict(), "opt": opt.state_dict(), "epoch": n}``
written with ``torch.save`` (to a temporary file, then renamed over the target, so a
crash never leaves half a checkpoint), read back with ``torch.load(weights_only=True)``.
The model's state is the unwrapped module's (``fsm_learner.checkpoint.unwrap_model``:
no ``module.`` prefix of DDP, no ``_orig_mod.`` of ``torch.compile``), and is loaded
back into the unwrapped module.

When it saves, at the end of each validation pass:

- ``monitor=None, every_epoch=False``: every epoch, over the same file (the latest);
- ``monitor="valid_loss"`` (any name the metrics callback provides): only when the
  monitored value improved on the best so far (the best), over the same file;
- ``every_epoch=True``: every epoch, into ``<dir>/epoch_<n>.pt``.

Across fits. The learner's optimizer persists across fits, so training goes on from one
fit to the next (``fit(2); fit(2)`` trains as ``fit(4)``), and so does the callback:

- it numbers epochs by its own count of the fit epochs it has seen (``epochs``): a fit's
  epoch ``n`` is number ``n`` plus the epochs of the earlier fits (those begun, cancelled
  ones included), so ``fit(2)`` then ``fit(2)`` write ``epoch_0.pt`` to ``epoch_3.pt``,
  as ``fit(4)`` does. That number is the checkpoint's ``"epoch"`` and ``best_epoch``; the
  audit note's ``ep`` stays the learner's ``learn.epoch``, the fit's own count. The
  passes of an ``lr_find`` sweep are not counted (``lr_find`` takes the callback out);
- the best value persists: a later fit saves only when it beats the best of every
  earlier one;
- ``saved`` lists every file written since the callback was made, each once.

``reset()`` starts over: no best, epochs numbered from 0 again, nothing listed in
``saved`` (the files stay on disk, to be overwritten by the next saves).

``load_best=True`` (with ``monitor``) loads the best checkpoint's weights back into
``learn.model`` when the fit ends: after a completed fit (``after_fit``) and after a
cancelled one (``after_cancel_fit``: early stopping ends fits by cancelling them, and its
best epoch is what it kept; fastai's SaveModelCallback does the same), not after a failure
or a preemption, whose weights are the ones to inspect or resume from. The optimizer is
left as it is, and nothing is loaded when no epoch was saved yet (a best epoch whose
file is gone fails the fit, naming the file). A ``load_best`` note in
the audit log names the file and its epoch.

Checkpoints: ``state_dict()`` holds what persists across fits, the epoch count and the
current fit's first epoch number, the ``saved`` paths (as strings), and the monitor's
state (name and mode, checked on load; latest, best and best epoch). Loaded at idle, it
carries over into the next fit as an uninterrupted run would (``before_fit`` keeps the
best); loaded after ``before_fit``, the resumed fit numbers and saves its epochs as the
uninterrupted one does.

Across ranks (a fit under torch.distributed, ``learn.world.size`` > 1) only rank 0
(``learn.world.is_main``) writes files and notes ``checkpoint``; the ranks' models are
the same. Every rank keeps the same count, best and ``saved`` list (the monitored value
is the same on every rank once MetricsCB has reduced it), so ``load_best`` works on
every rank: each calls ``learn.world.barrier()`` when the fit ends, so that rank 0's
writes are done, then loads the file (the ranks must see the same file system there).

Each save adds a ``checkpoint`` note to the audit log. Validate and predict runs are not
epochs of a fit: nothing is saved in them. No per-batch work, so no per-batch host-device
sync. SaveModelCB runs after EarlyStoppingCB (order 60 > 50): when early
stopping ends the fit in an ``after_epoch``, that epoch is not saved; with the same
monitor, that epoch did not improve anyway.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from callbacks._state import state_keys, state_list, state_optional, state_value
from callbacks.monitor import Mode, Monitor
from fsm_learner import Callback, ConfigurationError
from fsm_learner.checkpoint import unwrap_model
from fsm_learner.exceptions import CheckpointError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Mapping

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
    ``load_state_dict`` then copies them to wherever the model's parameters live. A
    wrapped model (DDP, ``torch.compile``) gets them in the module it wraps.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    missing = {"model", "opt", "epoch"} - set(checkpoint)
    if missing:
        msg = (
            f"{os.fspath(path)} is not a SaveModelCB checkpoint: it lacks {sorted(missing)} "
            f"(expected keys 'model', 'opt', 'epoch'; got {sorted(checkpoint)})"
        )
        raise ConfigurationError(msg)
    unwrap_model(model).load_state_dict(checkpoint["model"])
    if opt is not None:
        opt.load_state_dict(checkpoint["opt"])
    return int(checkpoint["epoch"])


def _check_path(path: object) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        msg = f"path must be a file path (or a directory with every_epoch=True), got {path!r}"
        raise ConfigurationError(msg)
    return Path(path)


def _check_load_best(load_best: object, monitor: str | None) -> bool:
    if not isinstance(load_best, bool):
        msg = f"load_best must be True or False, got {load_best!r} ({type(load_best).__name__})"
        raise ConfigurationError(msg)
    if load_best and monitor is None:
        msg = (
            "SaveModelCB: load_best=True loads the best epoch, which needs monitor= (a metric "
            "name such as 'valid_loss'); with monitor=None every epoch is saved and none is best"
        )
        raise ConfigurationError(msg)
    return load_best


class SaveModelCB(Callback):
    """Save the model and optimizer at the end of epochs: the best, the latest, or every one.

    ``path`` is the checkpoint file, or the directory of ``epoch_<n>.pt`` files when
    ``every_epoch=True``. With ``monitor`` (a name of the metrics callback such as
    ``"valid_loss"``), only epochs that improve on the best so far by more than
    ``min_delta`` are saved (``mode`` as in EarlyStoppingCB). Since the callback was made
    or last ``reset()``, across fits (see the module doc): ``epochs`` counts the fit
    epochs seen, which number the epochs; ``saved`` lists the files written, each once,
    in the order first written; ``best`` and ``best_epoch`` are the monitored value's
    best so far and its epoch's number (None without ``monitor``). ``load_best=True``
    loads the best checkpoint's weights into the model when the fit completes or is
    cancelled (it needs ``monitor``).
    """

    order = 60

    def __init__(  # noqa: PLR0913 (the path, then keyword-only settings)
        self,
        path: str | os.PathLike[str],
        *,
        monitor: str | None = None,
        mode: Mode = "auto",
        min_delta: float = 0.0,
        every_epoch: bool = False,
        load_best: bool = False,
    ) -> None:
        """Check the settings; the metrics provider is looked up when the fit starts."""
        self.path = _check_path(path)
        self.load_best = _check_load_best(load_best, monitor)
        if monitor is not None and every_epoch:
            msg = (
                f"SaveModelCB saves the best epoch (monitor={monitor!r}) or every epoch "
                "(every_epoch=True), not both: drop one"
            )
            raise ConfigurationError(msg)
        self.monitor = None if monitor is None else Monitor(monitor, mode, min_delta)
        self.every_epoch = every_epoch
        self.saved: list[Path] = []
        self._epochs = 0
        self._first = 0
        """The number of the current fit's first epoch: the epochs of the earlier fits."""

    @property
    def epochs(self) -> int:
        """The fit epochs seen (begun) so far across fits, the current one included."""
        return self._epochs

    @property
    def best(self) -> float | None:
        """The best monitored value so far, across fits (NaN before one); None without monitor."""
        return None if self.monitor is None else self.monitor.best

    @property
    def best_epoch(self) -> int | None:
        """The number of the epoch of ``best`` (-1 before one); None without monitor."""
        return None if self.monitor is None else self.monitor.best_epoch

    def reset(self) -> None:
        """Start over: forget the best, count epochs from 0 again, list no saved file.

        The files already written stay on disk; the next save may overwrite them.
        """
        if self.monitor is not None:
            self.monitor.best, self.monitor.best_epoch = math.nan, -1
        self.saved = []
        self._epochs = self._first = 0

    def before_fit(self, learn: Learner) -> None:
        """Find the metrics provider when monitoring, keeping the best of earlier fits."""
        monitor = self.monitor
        if monitor is not None:
            best, best_epoch = monitor.best, monitor.best_epoch
            monitor.bind(learn, type(self).__name__)  # forgets the best: put it back
            monitor.best, monitor.best_epoch = best, best_epoch

    def cleanup_epoch(self, learn: Learner) -> None:
        """Count the fit's epoch, however its pass ended."""
        if learn.kind is RunKind.FIT:
            self._epochs = self.epoch_number(learn) + 1

    def cleanup_fit(self, learn: Learner) -> None:
        """Start the next fit's epoch numbers after this fit's, however it ended."""
        self._first = self._epochs

    def epoch_number(self, learn: Learner) -> int:
        """Return the number of the fit's current epoch: ``learn.epoch`` plus earlier fits'."""
        return self._first + learn.epoch

    def after_epoch(self, learn: Learner) -> None:
        """At the end of the validation pass, save when this epoch is to be kept."""
        if learn.kind is not RunKind.FIT:
            return
        monitor = self.monitor
        if monitor is not None:
            monitor.capture()
        if learn.training:
            return
        if monitor is None or monitor.update(self.epoch_number(learn)):
            self._save(learn)

    def after_fit(self, learn: Learner) -> None:
        """With ``load_best``, load the best epoch's weights into the model."""
        self._load_best(learn)

    def after_cancel_fit(self, learn: Learner) -> None:
        """With ``load_best``, load the best epoch's weights, also when the fit was cancelled."""
        self._load_best(learn)

    def _load_best(self, learn: Learner) -> None:
        monitor = self.monitor
        if not self.load_best or monitor is None or learn.kind is not RunKind.FIT:
            return
        learn.world.barrier()  # every rank, best or not: rank 0's writes are done
        if monitor.best_epoch < 0:
            return
        checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
        unwrap_model(learn.model).load_state_dict(checkpoint["model"])
        learn.note("load_best", path=str(self.path), epoch=int(checkpoint["epoch"]))

    def state_dict(self) -> dict[str, Any]:
        """Return the epoch counts, the saved paths and the monitor's values (module doc)."""
        return {
            "epochs": self._epochs,
            "first": self._first,
            "saved": [str(path) for path in self.saved],
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what ``state_dict`` returned, at idle or after ``before_fit``."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("epochs", "first", "saved", "monitor"))
        epochs = state_value(owner, state, "epochs", int, "an int (fit epochs seen)")
        first = state_value(owner, state, "first", int, "an int (the fit's first epoch)")
        saved = state_list(owner, state, "saved", str, "file paths (str)")
        monitor = state_optional(owner, state, "monitor", dict, "a dict (Monitor.state_dict)")
        if (monitor is None) != (self.monitor is None):
            msg = (
                f"{owner}: the checkpoint was taken with monitor="
                f"{'None' if monitor is None else repr(monitor.get('name'))}, this callback "
                f"has monitor={'None' if self.monitor is None else repr(self.monitor.name)}: "
                f"resume with the same monitor"
            )
            raise CheckpointError(msg)
        if self.monitor is not None and monitor is not None:
            self.monitor.load_state_dict(monitor, owner)
        self._epochs, self._first, self.saved = epochs, first, [Path(p) for p in saved]

    def checkpoint_path(self, epoch: int) -> Path:
        """Where the checkpoint of the epoch numbered ``epoch`` goes."""
        return self.path / f"epoch_{epoch}.pt" if self.every_epoch else self.path

    def _save(self, learn: Learner) -> None:
        """Write the epoch's file and note it on rank 0; list it on every rank."""
        epoch = self.epoch_number(learn)
        target = self.checkpoint_path(epoch)
        if learn.world.is_main:
            _write(target, learn, epoch)
            fields: dict[str, Any] = {"path": str(target)}
            if self.monitor is not None:
                fields.update(monitor=self.monitor.name, value=self.monitor.best)
            learn.note("checkpoint", **fields)
        if target not in self.saved:
            self.saved.append(target)


def _write(target: Path, learn: Learner, epoch: int) -> None:
    """Write the checkpoint to a temporary file, then rename it over ``target``."""
    opt = learn.opt
    checkpoint: dict[str, Any] = {
        "model": unwrap_model(learn.model).state_dict(),
        "opt": {} if opt is None else opt.state_dict(),
        "epoch": epoch,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    torch.save(checkpoint, partial)
    partial.replace(target)
