"""MetricsCB: torchmetrics metrics and the mean loss per pass, on the learner and in the log.

This module owns the metric values other callbacks read. After each pass MetricsCB holds
``values``, a ``dict[str, float]`` keyed ``"<pass>_<name>"`` (``train_loss``,
``valid_accuracy``, ...), and appends the epoch's row to ``history``. A callback of
higher order finds it with ``find_metrics(learn, monitor)`` (which also checks that the
monitor is one of ``MetricsCB.names()``) and reads ``values[monitor]`` in ``after_epoch``.

Nothing here reads a tensor back to the host per batch: the loss is summed on the device
(``RunningMean``) and the metrics' states stay there too; all values become Python floats
in one transfer at the end of each pass.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import TYPE_CHECKING, Any, Final

import torch
from torchmetrics import Metric

from callbacks.device import resolve_device
from fsm_learner import Callback, ConfigurationError

if TYPE_CHECKING:
    from fsm_learner import Learner

__all__ = ["PASS_PREFIXES", "MetricsCB", "RunningMean", "batch_size", "find_metrics", "metrics_of"]

PASS_PREFIXES: Final = ("train", "valid")
"""The prefixes of the value keys: ``train_`` for training passes, ``valid_`` for validation."""
_TASK_PREFIXES: Final = ("Multiclass", "Multilabel", "Binary")
_NAME: Final = re.compile(r"[a-z][a-z0-9_]*")


def _prefix(training: bool) -> str:
    return PASS_PREFIXES[0] if training else PASS_PREFIXES[1]


def batch_size(batch: Any) -> int:
    """Return the number of samples in an ``(x, y)`` batch: the length of its targets."""
    target = batch[1]
    if isinstance(target, torch.Tensor):
        return int(target.shape[0]) if target.ndim else 1
    return len(target)


class RunningMean:
    """A weighted mean of scalar tensors kept on their device: adding never syncs."""

    def __init__(self) -> None:
        """Start empty."""
        self._sum: torch.Tensor | None = None
        self.count = 0

    def reset(self) -> None:
        """Forget everything added."""
        self._sum, self.count = None, 0

    def add(self, value: torch.Tensor, weight: int) -> None:
        """Add ``value`` (a 0-d tensor, the mean over ``weight`` samples) on its device."""
        if value.ndim != 0:
            msg = (
                f"the loss must be a scalar (a mean over the batch) to be averaged, got shape "
                f"{list(value.shape)}; use a loss with reduction='mean'"
            )
            raise ConfigurationError(msg)
        weighted = value.detach().float() * weight
        self._sum = weighted if self._sum is None else self._sum.add_(weighted)
        self.count += weight

    def mean(self) -> torch.Tensor:
        """Return the mean as a 0-d tensor on the values' device; NaN when nothing was added."""
        if self._sum is None or self.count == 0:
            return torch.tensor(math.nan)
        return self._sum / self.count


def _derived_name(metric: Metric) -> str:
    """``MulticlassAccuracy`` -> ``accuracy``, ``MulticlassF1Score`` -> ``f1_score``."""
    name = type(metric).__name__
    for prefix in _TASK_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix) :]
            break
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _check_metric(name: str, metric: object) -> Metric:
    if not isinstance(metric, Metric):
        msg = (
            f"MetricsCB: metric {name!r} must be a torchmetrics.Metric instance "
            f"(torchmetrics.classification.MulticlassAccuracy(num_classes=10), say), "
            f"got {metric!r} of type {type(metric).__name__}"
        )
        raise ConfigurationError(msg)
    return metric


def _named_metrics(metrics: tuple[Metric, ...], named: dict[str, Metric]) -> dict[str, Metric]:
    pairs = [(_derived_name(_check_metric(str(i), m)), m) for i, m in enumerate(metrics)]
    pairs += [(name, _check_metric(name, m)) for name, m in named.items()]
    result: dict[str, Metric] = {}
    for name, metric in pairs:
        if name == "loss" or not _NAME.fullmatch(name):
            msg = (
                f"MetricsCB: invalid metric name {name!r}; names are lower_snake_case "
                f"identifiers other than 'loss' (MetricsCB always reports the loss)"
            )
            raise ConfigurationError(msg)
        if name in result:
            msg = (
                f"MetricsCB: two metrics are named {name!r}; name them yourself, as in "
                f"MetricsCB({name}=..., other_{name}=...)"
            )
            raise ConfigurationError(msg)
        result[name] = metric
    return result


def _to_floats(named: dict[str, torch.Tensor]) -> dict[str, float]:
    """Turn scalar tensors into Python floats with one device-to-host transfer."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            msg = (
                f"MetricsCB: metric {name!r} computed {shape}, not a scalar; MetricsCB records "
                f"one number per metric (for a classification metric, pass average='macro' "
                f"or 'micro' rather than average=None)"
            )
            raise ConfigurationError(msg)
    if not named:
        return {}
    device = next(iter(named.values())).device
    stacked = torch.stack(
        [v.detach().reshape(()).to(device, torch.float32) for v in named.values()]
    )
    return dict(zip(named, stacked.tolist(), strict=True))


class MetricsCB(Callback):
    """Compute torchmetrics metrics and the mean loss on each pass, separately per pass.

    ``MetricsCB(MulticlassAccuracy(num_classes=10), f1=MulticlassF1Score(num_classes=10))``
    names a positional metric after its class, less the task prefix and in lower snake
    case (``accuracy``), and a keyword metric by its keyword. It keeps a training and a
    validation copy of each and updates it in ``after_batch`` with ``learn.preds``
    (detached) and ``learn.batch[1]``; the loss is averaged over samples, assuming
    ``learn.loss`` is the batch's mean. At each pass end it sets ``values``
    (``train_loss``, ``train_accuracy``, ... then ``valid_loss``, ``valid_accuracy``, ...;
    a pass that completed no batch gives NaN), updates the epoch's row of ``history``, and
    writes the pass's values to the audit log as a ``metrics`` note. A cancelled pass
    reports what its completed batches gave, with ``complete=False`` in the note.

    The metrics run on ``device`` (default: the device of the model's parameters at fit
    start, so after DeviceCB). MetricsCB itself never syncs per batch, but a metric's
    ``update`` may: torchmetrics checks its inputs unless built with
    ``validate_args=False`` (``torch.unique``), and macro-averaged multiclass metrics
    count with ``torch.bincount``, both of which wait for the GPU. Order 20.
    """

    order = 20

    def __init__(
        self,
        *metrics: Metric,
        device: str | torch.device | None = None,
        **named: Metric,
    ) -> None:
        """Check and name the metrics; keep a training and a validation copy of each."""
        self.metrics = _named_metrics(metrics, named)
        self.device = None if device is None else resolve_device(device)
        self._passes: dict[bool, dict[str, Metric]] = {
            training: {name: m.clone() for name, m in self.metrics.items()}
            for training in (True, False)
        }
        self._loss = RunningMean()
        self._in_pass = False
        self._batches = 0
        self._epoch = -1
        self.values: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def names(self) -> list[str]:
        """Return the keys of ``values``: ``train_loss``, ``train_<metric>``..., ``valid_...``."""
        return [f"{p}_{name}" for p in PASS_PREFIXES for name in ("loss", *self.metrics)]

    def before_fit(self, learn: Learner) -> None:
        """Forget the last fit's values; put the metrics where the model is."""
        device = self.device or _model_device(learn)
        for metrics in self._passes.values():
            for metric in metrics.values():
                metric.to(device)
        self.values, self.history, self._epoch = {}, [], -1

    def before_epoch(self, learn: Learner) -> None:
        """Start the pass's sums from zero; a new epoch starts new ``values``."""
        if learn.epoch != self._epoch:
            self.values, self._epoch = {}, learn.epoch
        for metric in self._passes[learn.training].values():
            metric.reset()
        self._loss.reset()
        self._batches = 0
        self._in_pass = True

    def after_batch(self, learn: Learner) -> None:
        """Add the batch to the pass's loss sum and metric states, on the device."""
        target = learn.batch[1]
        self._loss.add(learn.loss, batch_size(learn.batch))
        preds = learn.preds.detach() if isinstance(learn.preds, torch.Tensor) else learn.preds
        for metric in self._passes[learn.training].values():
            metric.update(preds, target)
        self._batches += 1

    def after_epoch(self, learn: Learner) -> None:
        """Compute the pass's values; later callbacks read them in their after_epoch."""
        self._finish_pass(learn, complete=True)

    def after_cancel_epoch(self, learn: Learner) -> None:
        """Report what the completed batches of a cancelled pass gave."""
        self._finish_pass(learn, complete=False)

    def _finish_pass(self, learn: Learner, *, complete: bool) -> None:
        if not self._in_pass:  # cancelled before our before_epoch, or already finished
            return
        self._in_pass = False
        values = self._pass_values(learn.training)
        self.values = {**self.values, **values}
        self._record_row(learn.epoch)
        learn.note("metrics", batches=self._batches, complete=complete, **values)

    def _pass_values(self, training: bool) -> dict[str, float]:
        prefix = _prefix(training)
        keys = [f"{prefix}_{name}" for name in ("loss", *self.metrics)]
        if self._batches == 0:
            return dict.fromkeys(keys, math.nan)
        tensors = {keys[0]: self._loss.mean()}
        for key, metric in zip(keys[1:], self._passes[training].values(), strict=True):
            tensors[key] = metric.compute()
        return _to_floats(tensors)

    def _record_row(self, epoch: int) -> None:
        row: dict[str, float] = {"epoch": epoch, **self.values}
        if self.history and self.history[-1]["epoch"] == epoch:
            self.history[-1] = row
        else:
            self.history.append(row)

    def __repr__(self) -> str:
        """Name the metrics besides the class and the order."""
        return f"MetricsCB(metrics={list(self.metrics)}, order={self.order})"


def _model_device(learn: Learner) -> torch.device:
    param = next(iter(learn.model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def metrics_of(learn: Learner) -> MetricsCB | None:
    """Return the first MetricsCB among ``learn.cbs``, or None when there is none."""
    return next((cb for cb in learn.cbs if isinstance(cb, MetricsCB)), None)


def find_metrics(learn: Learner, monitor: str | None = None) -> MetricsCB:
    """Return the learner's MetricsCB, checking that ``monitor`` is one of its names.

    For callbacks that act on a metric (early stopping, saving the best model): call it
    in ``before_fit`` to fail early, then read ``values[monitor]`` in ``after_epoch``.
    Raises ``ConfigurationError`` when there is no MetricsCB, or for an unknown monitor.
    """
    found = metrics_of(learn)
    if found is None:
        wanted = f" to read {monitor!r}" if monitor else ""
        msg = (
            f"no MetricsCB among the learner's callbacks{wanted}; add "
            f"callbacks.metrics.MetricsCB(...) to cbs (it reports "
            f"{', '.join(f'{p}_loss' for p in PASS_PREFIXES)} and one key per metric); "
            f"got cbs={learn.cbs!r}"
        )
        raise ConfigurationError(msg)
    if monitor is not None and monitor not in found.names():
        close = difflib.get_close_matches(monitor, found.names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        msg = f"unknown monitor {monitor!r}; {hint}valid: {', '.join(found.names())}"
        raise ConfigurationError(msg)
    return found
