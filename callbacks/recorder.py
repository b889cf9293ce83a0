"""Recorder: the history of a fit (loss and learning rate per batch, metrics per epoch).

This module owns the record of a fit and its plot. Per completed training batch the
Recorder keeps the learning rate the optimizer step used (a Python float read from the
param group, no sync) and the loss as a detached device tensor; the losses become Python
floats only when read (``losses``, ``plot``), in one transfer. Per epoch it keeps
MetricsCB's values when the learner has one. ``plot`` writes a PNG with matplotlib
(the ``callbacks`` extra), without touching pyplot's global state.

Checkpoints: ``state_dict()`` holds the record so far: ``lrs`` (floats), ``losses`` (one
float32 CPU tensor, read from the device once) and ``epochs`` (the rows). Loaded after
``before_fit`` (a resumed fit) the record goes on, so it ends as the uninterrupted fit's;
loaded at idle, it is there to read and plot until the next fit's ``before_fit`` starts
a new record, as it would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from callbacks._state import state_keys, state_list, state_value
from callbacks.metrics import PASS_PREFIXES
from callbacks.monitor import metrics_of
from fsm_learner import Callback
from fsm_learner.exceptions import CheckpointError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping

    from matplotlib.axes import Axes

    from fsm_learner import Learner

__all__ = ["Recorder"]


class Recorder(Callback):
    """Record the loss and learning rate of each training batch, and the metrics per epoch.

    Each fit starts a new record. ``lrs`` and ``losses`` have one entry per completed
    training batch (a cancelled batch is not recorded); ``epochs`` has one row per epoch
    with the metrics callback's values (``{"epoch": 0, "train_loss": ...,
    "valid_accuracy": ...}``), updated when each pass ends by any route, empty without
    one. Validate and predict runs are not part of a fit's record: they leave it as it is.
    Order 30: after MetricsCB (20) has computed a pass's values.
    """

    order = 30

    def __init__(self) -> None:
        """Start with an empty record."""
        self._lrs: list[float | torch.Tensor] = []
        self._chunks: list[torch.Tensor] = []
        self._pending: list[torch.Tensor] = []
        self._lr: float | torch.Tensor = float("nan")
        self._epochs: dict[int, dict[str, float]] = {}

    @property
    def lrs(self) -> list[float]:
        """The learning rate of the first param group at each completed training batch."""
        return [float(lr) for lr in self._lrs]

    @property
    def losses(self) -> list[float]:
        """The loss of each completed training batch (read from the device now, at once)."""
        values: list[float] = self._loss_tensor().tolist()
        return values

    @property
    def epochs(self) -> list[dict[str, float]]:
        """MetricsCB's values per epoch, in epoch order."""
        return [dict(row) for row in self._epochs.values()]

    def before_fit(self, learn: Learner) -> None:
        """Forget the last fit's record."""
        self._lrs, self._chunks, self._pending, self._epochs = [], [], [], {}
        self._lr = float("nan")

    def after_backward(self, learn: Learner) -> None:
        """Note the learning rate the coming optimizer step uses (schedulers step after it)."""
        if learn.opt is not None:
            self._lr = learn.opt.param_groups[0]["lr"]

    def after_batch(self, learn: Learner) -> None:
        """Record a completed training batch: its learning rate and its loss, on the device."""
        if learn.training:  # only a fit has training passes
            self._lrs.append(self._lr)
            self._pending.append(learn.loss.detach().float())

    def cleanup_epoch(self, learn: Learner) -> None:
        """When a pass of a fit ends, by any route: keep its metrics, pack its losses."""
        if learn.kind is not RunKind.FIT:
            return
        if self._pending:
            self._chunks.append(torch.stack(self._pending))  # asynchronous on a device
            self._pending = []
        metrics = metrics_of(learn)
        if metrics is not None and metrics.values:
            self._epochs[learn.epoch] = {"epoch": learn.epoch, **metrics.values}

    def state_dict(self) -> dict[str, Any]:
        """Return the record so far: learning rates, losses (a CPU tensor) and epoch rows."""
        return {"lrs": self.lrs, "losses": self._loss_tensor(), "epochs": self.epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back the record ``state_dict`` returned, at idle or after ``before_fit``."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("lrs", "losses", "epochs"))
        lrs = state_list(owner, state, "lrs", float, "floats (learning rates)")
        losses = state_value(owner, state, "losses", torch.Tensor, "a 1-d tensor of losses")
        rows = state_list(owner, state, "epochs", dict, "dicts (metrics per epoch)")
        if losses.ndim != 1 or len(losses) != len(lrs):
            msg = (
                f"{owner}: state['losses'] must be a 1-d tensor with one loss per learning "
                f"rate ({len(lrs)}), got shape {list(losses.shape)}"
            )
            raise CheckpointError(msg)
        if not all(isinstance(row.get("epoch"), int) for row in rows):
            msg = f"{owner}: each row of state['epochs'] must have an int 'epoch', got {rows!r}"
            raise CheckpointError(msg)
        self._lrs, self._chunks, self._pending = list(lrs), [losses] if len(losses) else [], []
        self._epochs = {int(row["epoch"]): dict(row) for row in rows}

    def _loss_tensor(self) -> torch.Tensor:
        chunks = [*self._chunks, *([torch.stack(self._pending)] if self._pending else [])]
        if not chunks:
            return torch.empty(0)
        device = chunks[0].device
        return torch.cat([c.to(device) for c in chunks]).cpu()

    def plot(self, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
        """Write a PNG of the loss and learning rate per batch, and the metrics per epoch.

        Needs matplotlib (``pip install 'fsm-learner[callbacks]'``); uses its Agg canvas
        directly, so pyplot's backend and figures are left alone. Returns the path.
        """
        try:
            from matplotlib.figure import Figure  # noqa: PLC0415 (an optional extra)
        except ImportError as exc:
            msg = "Recorder.plot needs matplotlib: pip install 'fsm-learner[callbacks]'"
            raise ModuleNotFoundError(msg) from exc
        names = self._metric_names()
        fig = Figure(figsize=(7, 2.6 * (2 + len(names))), layout="constrained")
        axes = fig.subplots(2 + len(names), 1, squeeze=False)[:, 0]
        _plot_series(axes[0], self.losses, "training loss", "batch")
        _plot_series(axes[1], self.lrs, "learning rate", "batch")
        for ax, name in zip(axes[2:], names, strict=True):
            self._plot_metric(ax, name)
        target = Path(path)
        fig.savefig(target, format="png", dpi=dpi)
        return target

    def _metric_names(self) -> list[str]:
        """Return the metric names less their pass prefix (loss, accuracy, ...), as first seen."""
        names: dict[str, None] = {}
        for row in self._epochs.values():
            for key in row:
                prefix, _, name = key.partition("_")
                if prefix in PASS_PREFIXES and name:
                    names[name] = None
        return list(names)

    def _plot_metric(self, ax: Axes, name: str) -> None:
        for prefix in PASS_PREFIXES:
            key = f"{prefix}_{name}"
            rows = [row for row in self._epochs.values() if key in row]
            ax.plot([row["epoch"] + 1 for row in rows], [row[key] for row in rows], label=prefix)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()


def _plot_series(ax: Axes, values: list[float], title: str, xlabel: str) -> None:
    ax.plot(range(1, len(values) + 1), values)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
