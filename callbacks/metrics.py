"""MetricsCB: torchmetrics metrics and the mean loss per pass, on the learner and in the log.

This module owns the metric values other callbacks read, and the names of the passes.
MetricsCB meets ``fsm_learner.callback.MetricsProvider``: after each pass of a fit it
holds ``values``, a ``dict[str, float]`` keyed ``"<pass>_<name>"`` (``train_loss``,
``valid_accuracy``, ...), and updates the epoch's row of ``history``; after every pass, a
validate run's included, ``last_pass()`` holds that pass's values by name alone (``loss``,
``accuracy``): what ``Learner.validate`` returns. Callbacks of higher order find it with
``callbacks.monitor.metrics_of`` (or watch one value with ``callbacks.monitor.Monitor``)
and read ``values`` in their ``after_epoch``.

Nothing here reads a tensor back to the host per batch: the loss is summed on the device
(``RunningMean``) and the metrics' states stay there too; at the end of each pass the
loss sum is read once, and the metrics' values become Python floats in one transfer.

Across ranks (a fit under torch.distributed, ``learn.world.size`` > 1) the values are
the same on every rank, those of all the ranks' samples. At each pass end one
``learn.world.sum`` adds up the ranks' loss sums, sample counts and metric updates (so
the loss is the mean over every rank's samples, and every rank computes the metrics, or
none does); each torchmetrics metric then gathers its states from every rank itself in
``compute()``, over the default process group (with nccl its states must be on the GPU,
as they are by default: on the model's device). Every rank ends
each pass with the same ``values``, so the callbacks that read them (early stopping, the
best model) decide the same on every rank. ``batches`` in the ``metrics`` note is this
rank's own count. The state for checkpoints is each rank's own (its own sums).

Checkpoints: ``state_dict()`` holds ``values``, ``history`` and ``last_pass()``, the epoch
``values`` belongs to, where the current pass stands (``"unseen"``, ``"open"``,
``"finished"``) and which pass it is, and, for an open pass, its batch and update counts,
the running loss sum (a tensor on its device, or None) and count, and every metric's
state tensors (torchmetrics ``metric_state``) with its update count. Loaded after
``before_epoch`` (a fit resumed mid-pass), the pass goes on from its sums, so its values
equal the uninterrupted pass's; after ``before_fit`` (between passes), ``values`` and
``history`` go on. Loaded at idle, the values and history are there to read until the
next fit's ``before_fit`` starts afresh, as it would have.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

import torch
from torchmetrics import Metric

from callbacks._state import state_keys, state_list, state_optional, state_value
from callbacks.device import resolve_device
from fsm_learner import Callback, ConfigurationError
from fsm_learner.batch import batch_size
from fsm_learner.exceptions import CheckpointError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner

__all__ = ["PASS_PREFIXES", "MetricsCB", "RunningMean", "pass_name"]

PASS_PREFIXES: Final = ("train", "valid")
"""The prefixes of the value keys: ``train_`` for training passes, ``valid_`` for validation."""
_TASK_PREFIXES: Final = ("Multiclass", "Multilabel", "Binary")
_NAME: Final = re.compile(r"[a-z][a-z0-9_]*")


def pass_name(training: bool) -> str:
    """Name a pass as value keys and progress lines do: ``train`` or ``valid``."""
    return PASS_PREFIXES[0] if training else PASS_PREFIXES[1]


class RunningMean:
    """A weighted mean of scalar tensors kept on their device: adding never syncs."""

    def __init__(self) -> None:
        """Start empty."""
        self._sum: torch.Tensor | None = None
        self.count = 0

    def reset(self) -> None:
        """Forget everything added."""
        self._sum, self.count = None, 0

    def total(self) -> float:
        """Return the weighted sum as a Python float (one read from the device); 0 when empty."""
        return 0.0 if self._sum is None else float(self._sum)

    def add(self, value: torch.Tensor, weight: int) -> None:
        """Add ``value`` (a 0-d tensor, the mean over ``weight`` samples) on its device."""
        if value.ndim != 0:
            msg = (
                f"the loss must be a scalar (a mean over the batch) to be averaged, got shape "
                f"{list(value.shape)}; use a loss with reduction='mean'"
            )
            raise ConfigurationError(msg)
        weighted = value.detach().float() * weight
        if self._sum is not None and self._sum.device != weighted.device:  # loaded elsewhere
            self._sum = self._sum.to(weighted.device)
        self._sum = weighted if self._sum is None else self._sum.add_(weighted)
        self.count += weight

    def state_dict(self) -> dict[str, Any]:
        """Return the weighted sum (a 0-d tensor on its device, or None) and the count."""
        return {"sum": self._sum, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any], owner: str) -> None:
        """Take back what ``state_dict`` returned; ``owner`` names the callback, for messages."""
        state = state_keys(owner, state, ("sum", "count"))
        total = state_optional(owner, state, "sum", torch.Tensor, "a 0-d tensor")
        count = state_value(owner, state, "count", int, "an int (samples added)")
        if total is not None and total.ndim != 0:
            msg = f"{owner}: the loss sum must be a 0-d tensor, got shape {list(total.shape)}"
            raise CheckpointError(msg)
        self._sum, self.count = total, count

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


class _PassState(Enum):
    """Where MetricsCB stands in the current pass."""

    UNSEEN = "unseen"
    """Not begun for MetricsCB: between passes, or cancelled before its before_epoch."""
    OPEN = "open"
    FINISHED = "finished"


class MetricsCB(Callback):
    """Compute torchmetrics metrics and the mean loss on each pass, separately per pass.

    ``MetricsCB(MulticlassAccuracy(num_classes=10), f1=MulticlassF1Score(num_classes=10))``
    names a positional metric after its class, less the task prefix and in lower snake
    case (``accuracy``), and a keyword metric by its keyword. It keeps a training and a
    validation copy of each and updates it in ``after_batch`` with ``learn.preds``
    (detached: the logits when the model computes its own loss) and ``learn.target``; a
    batch without a target adds to the loss but to no metric. The loss is averaged over
    samples (``fsm_learner.batch.batch_size``), assuming ``learn.loss`` is the batch's
    mean. At each pass end it sets ``last_pass()`` (``loss``, ``accuracy``, ...; a pass
    that completed no batch gives NaN) and writes the pass's values to the audit log as a
    ``metrics`` note; in a fit it also sets ``values`` (``train_loss``, ``train_accuracy``,
    ... then ``valid_loss``, ``valid_accuracy``, ...) and updates the epoch's row of
    ``history``. A pass that ends early (cancelled, or before this callback saw it begin)
    reports what its completed batches gave, with ``complete=False`` in the note; a pass
    that fails reports nothing.

    Runs: in a fit, as above. A validate run (``learn.validate()``) is one validation pass:
    its values go to ``last_pass()`` and the log, never to ``values`` or ``history``, which
    keep the fit's (what monitors and recorders read). A predict run computes no loss:
    MetricsCB does nothing in it.

    The metrics run on ``device`` (default: the device of the model's parameters when a
    pass starts, so after DeviceCB). MetricsCB itself never syncs per batch, but a
    metric's ``update`` may: torchmetrics checks its inputs unless built with
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
        self._state = _PassState.UNSEEN
        self._training = True
        """Which pass ``_state`` is about."""
        self._batches = 0
        self._updates = 0
        self._epoch = -1
        self._last_pass: dict[str, float] = {}
        self.values: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        """Return the values, the history and the open pass's sums (see the module doc)."""
        open_pass = self._state is _PassState.OPEN
        return {
            "values": dict(self.values),
            "history": [dict(row) for row in self.history],
            "last_pass": dict(self._last_pass),
            "epoch": self._epoch,
            "pass_state": self._state.value,
            "training": self._training,
            "batches": self._batches,
            "updates": self._updates,
            "loss": self._loss.state_dict() if open_pass else None,
            "metrics": self._metric_states(self._training) if open_pass else None,
        }

    def _metric_states(self, training: bool) -> dict[str, dict[str, Any]]:
        return {
            name: {"state": dict(metric.metric_state), "updates": metric.update_count}
            for name, metric in self._passes[training].items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what ``state_dict`` returned, at idle or after before_fit/before_epoch."""
        owner = type(self).__name__
        state = state_keys(owner, state, _STATE_KEYS)
        values = _floats(owner, state_value(owner, state, "values", dict, "a dict"), "values")
        history = [
            _floats(owner, row, "history")
            for row in state_list(owner, state, "history", dict, "dicts (one row per epoch)")
        ]
        last = _floats(owner, state_value(owner, state, "last_pass", dict, "a dict"), "last_pass")
        pass_state = _pass_state(owner, state["pass_state"])
        training = state_value(owner, state, "training", bool, "a bool")
        counts = [state_value(owner, state, key, int, "an int") for key in ("epoch", "batches")]
        updates = state_value(owner, state, "updates", int, "an int")
        if pass_state is _PassState.OPEN:
            self._load_open_pass(owner, state, training)
        self.values, self.history, self._last_pass = values, history, last
        self._epoch, self._batches = counts
        self._updates, self._state, self._training = updates, pass_state, training

    def _load_open_pass(self, owner: str, state: Mapping[str, Any], training: bool) -> None:
        metrics = state_value(owner, state, "metrics", dict, "a dict (metric states by name)")
        if set(metrics) != set(self.metrics):
            msg = (
                f"{owner}: the checkpoint has metrics {sorted(metrics)}, this callback "
                f"{sorted(self.metrics)}: resume with the same metrics"
            )
            raise CheckpointError(msg)
        loss = state_value(owner, state, "loss", dict, "a dict (RunningMean.state_dict)")
        self._loss.load_state_dict(loss, owner)
        for name, metric in self._passes[training].items():
            _load_metric(owner, name, metric, metrics[name])

    def names(self) -> list[str]:
        """Return the keys of ``values``: ``train_loss``, ``train_<metric>``..., ``valid_...``."""
        return [f"{p}_{name}" for p in PASS_PREFIXES for name in ("loss", *self.metrics)]

    def last_pass(self) -> Mapping[str, float]:
        """Return the last pass's values by name alone (``loss``, ``accuracy``, ...)."""
        return dict(self._last_pass)

    def before_fit(self, learn: Learner) -> None:
        """Forget the last fit's values and history."""
        self.values, self.history, self._epoch = {}, [], -1

    def before_epoch(self, learn: Learner) -> None:
        """Start the pass's sums from zero, on the model's device; a new epoch, new ``values``."""
        if learn.kind is RunKind.PREDICT:
            return
        if learn.kind is RunKind.FIT and learn.epoch != self._epoch:
            self.values, self._epoch = {}, learn.epoch
        device = self.device or _model_device(learn)
        for metric in self._passes[learn.training].values():
            metric.to(device)  # cheap when they are there already
            metric.reset()
        self._loss.reset()
        self._batches = self._updates = 0
        self._state, self._training = _PassState.OPEN, learn.training

    def after_batch(self, learn: Learner) -> None:
        """Add the batch to the pass's loss sum and metric states, on the device."""
        if self._state is not _PassState.OPEN:
            return
        self._loss.add(learn.loss, batch_size(learn.batch, learn.target_key))
        self._batches += 1
        target = learn.target
        if target is None:
            return
        preds = learn.preds.detach() if isinstance(learn.preds, torch.Tensor) else learn.preds
        if isinstance(target, torch.Tensor):
            target = target.detach()
        for metric in self._passes[learn.training].values():
            metric.update(preds, target)
        self._updates += 1

    def after_epoch(self, learn: Learner) -> None:
        """Compute the pass's values; later callbacks read them in their after_epoch."""
        if self._state is _PassState.OPEN:
            self._finish_pass(learn, complete=True)

    def cleanup_epoch(self, learn: Learner) -> None:
        """Report a pass that ended early with what its completed batches gave; then forget it.

        A failed pass reports nothing: its values may be what failed.
        """
        state, self._state = self._state, _PassState.UNSEEN
        reported = state is _PassState.FINISHED or learn.kind is RunKind.PREDICT
        if not reported and learn.failure is None:
            self._finish_pass(learn, complete=False)
        self._loss.reset()
        self._batches = self._updates = 0  # a pass cancelled before before_epoch gets none

    def _finish_pass(self, learn: Learner, *, complete: bool) -> None:
        self._state = _PassState.FINISHED
        values = self._pass_values(learn)
        self._last_pass = values
        prefix = pass_name(learn.training)
        keyed = {f"{prefix}_{name}": value for name, value in values.items()}
        if learn.kind is RunKind.FIT:
            self.values = {**self.values, **keyed}
            self._record_row(learn.epoch)
        learn.note("metrics", batches=self._batches, complete=complete, **keyed)

    def _pass_values(self, learn: Learner) -> dict[str, float]:
        """Return the pass's values over every rank: one ``world.sum``, then the metrics."""
        reduced = learn.world.sum([self._loss.total(), self._loss.count, self._updates])
        loss_sum, count, updates = reduced
        tensors: dict[str, torch.Tensor] = {}
        if updates:  # on any rank: every rank computes, as torchmetrics syncs in compute
            for name, metric in self._passes[learn.training].items():
                tensors[name] = metric.compute()
        computed = _to_floats(tensors)
        loss = _as_float32(loss_sum / count) if count else math.nan
        return {"loss": loss} | {name: computed.get(name, math.nan) for name in self.metrics}

    def _record_row(self, epoch: int) -> None:
        row: dict[str, float] = {"epoch": epoch, **self.values}
        if self.history and self.history[-1]["epoch"] == epoch:
            self.history[-1] = row
        else:
            self.history.append(row)

    def __repr__(self) -> str:
        """Name the metrics besides the class and the order."""
        return f"MetricsCB(metrics={list(self.metrics)}, order={self.order})"


_STATE_KEYS: Final = (
    "values",
    "history",
    "last_pass",
    "epoch",
    "pass_state",
    "training",
    "batches",
    "updates",
    "loss",
    "metrics",
)


def _as_float32(value: float) -> float:
    """Round ``value`` to float32, as the metrics' values are.

    On one process the loss is then exactly the float32 mean the device would compute.
    """
    return float(torch.tensor(value, dtype=torch.float32))


def _floats(owner: str, named: Mapping[str, Any], key: str) -> dict[str, float]:
    """Return ``named`` when it maps names to numbers (a row's epoch is an int)."""
    if not all(isinstance(k, str) and isinstance(v, int | float) for k, v in named.items()):
        msg = f"{owner}: state[{key!r}] must map names to numbers, got {named!r}"
        raise CheckpointError(msg)
    return dict(named)


def _pass_state(owner: str, value: object) -> _PassState:
    valid = [s.value for s in _PassState]
    if value not in valid:
        msg = f"{owner}: state['pass_state'] must be one of {valid}, got {value!r}"
        raise CheckpointError(msg)
    return _PassState(value)


def _load_metric(owner: str, name: str, metric: Metric, saved: object) -> None:
    """Put a metric's saved state tensors back, on the device its states are on now."""
    where = f"{owner}: metric {name!r}"
    saved = state_keys(where, saved, ("state", "updates"))
    states = state_value(where, saved, "state", dict, "a dict (the metric's metric_state)")
    updates = state_value(where, saved, "updates", int, "an int (its update count)")
    current = metric.metric_state
    if set(states) != set(current):
        msg = f"{where}: the checkpoint has states {sorted(states)}, the metric {sorted(current)}"
        raise CheckpointError(msg)
    for key, now in current.items():
        setattr(metric, key, _on_device(where, key, states[key], now, metric.device))
    metric._update_count = updates  # noqa: SLF001 (torchmetrics has no setter; compute warns at 0)
    metric._computed = None  # noqa: SLF001 (the cache of compute, stale after new states)


def _on_device(where: str, key: str, value: object, now: object, device: torch.device) -> object:
    """Return ``value`` (a tensor, or a list of them, as ``now`` is) moved to ``device``."""
    if isinstance(now, torch.Tensor) and isinstance(value, torch.Tensor):
        return value.to(device)
    values = value if isinstance(now, list) and isinstance(value, list | tuple) else None
    if values is not None and all(isinstance(v, torch.Tensor) for v in values):
        return [v.to(device) for v in values]
    msg = f"{where}: state {key!r} must be a tensor, or a list as the metric's; got {value!r}"
    raise CheckpointError(msg)


def _model_device(learn: Learner) -> torch.device:
    param = next(iter(learn.model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
