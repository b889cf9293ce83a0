"""DeviceCB: put the model and every batch on one device (and dtype), without a host-device sync.

This module owns the device checks the stock callbacks share: ``resolve_device`` turns a
device string into a ``torch.device`` or a ``ConfigurationError`` that names what torch
knows and what is available here, ``default_device`` picks the first available
accelerator, and ``to_device`` moves a batch (tensors nested in tuples, lists and
mappings), converting its floating-point tensors to a dtype when asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import nn

from fsm_learner import Callback, ConfigurationError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from fsm_learner import Learner

__all__ = [
    "FLOAT_DTYPES",
    "DeviceCB",
    "available_device_types",
    "default_device",
    "resolve_device",
    "to_device",
]

_DEVICE_TYPES: Final = ("cpu", "cuda", "mps", "xpu", "meta")
"""The device types error messages offer; torch knows more (its message is chained)."""
_ACCELERATORS: Final = ("cuda", "mps", "xpu")
"""The accelerators ``default_device`` tries, in this order."""
FLOAT_DTYPES: Final = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes ``DeviceCB(dtype=...)`` converts a model and its batches to."""


def _is_available(device_type: str) -> bool | None:
    """Say whether ``device_type`` can be used here; None when torch cannot tell."""
    if device_type in {"cpu", "meta"}:
        return True
    if device_type == "mps":
        return bool(torch.backends.mps.is_available())
    check = getattr(getattr(torch, device_type, None), "is_available", None)
    return bool(check()) if callable(check) else None


def available_device_types() -> list[str]:
    """Return the device types of ``_DEVICE_TYPES`` that this machine can use."""
    return [t for t in _DEVICE_TYPES if _is_available(t)]


def default_device() -> torch.device:
    """Return the first available accelerator (cuda, mps, xpu), else the CPU."""
    for device_type in _ACCELERATORS:
        if _is_available(device_type):
            return torch.device(device_type)
    return torch.device("cpu")


def _parse(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        msg = (
            f"unknown device {device!r}; valid device types: {', '.join(_DEVICE_TYPES)} "
            f"(and the others torch lists below), optionally with an index ('cuda:1'); "
            f"available here: {', '.join(available_device_types())}"
        )
        raise ConfigurationError(msg) from exc


def _check_index(device: torch.device) -> None:
    count = getattr(getattr(torch, device.type, None), "device_count", None)
    if device.index is None or not callable(count):
        return
    n = int(count())
    if device.index >= n:
        msg = (
            f"device {str(device)!r} does not exist: torch.{device.type}.device_count() is {n}, "
            f"so valid indices are 0 to {n - 1}"
        )
        raise ConfigurationError(msg)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device`` as a ``torch.device`` this machine can use; None means the default.

    Raises ``ConfigurationError`` for a string torch does not know ('cdua'), a device
    type that is not available here ('cuda' without CUDA), or an index out of range.
    """
    if device is None:
        return default_device()
    parsed = _parse(device)
    if _is_available(parsed.type) is False:
        msg = (
            f"device {str(parsed)!r} is not available: "
            f"{_availability_check(parsed.type)} is False (torch {torch.__version__}); "
            f"available here: {', '.join(available_device_types())}"
        )
        raise ConfigurationError(msg)
    _check_index(parsed)
    return parsed


def _availability_check(device_type: str) -> str:
    if device_type == "mps":
        return "torch.backends.mps.is_available()"
    return f"torch.{device_type}.is_available()"


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Return ``batch`` with every tensor moved to ``device`` (``non_blocking``, no sync).

    With ``dtype``, floating-point tensors are converted to it too; integer and boolean
    tensors (labels, token ids, masks) keep theirs. Tuples (named ones too), lists and
    mappings (rebuilt as dicts) are rebuilt around the moved tensors, at any depth;
    anything else is returned as it is.
    """
    if isinstance(batch, torch.Tensor):
        cast = dtype if dtype is not None and batch.is_floating_point() else None
        return batch.to(device=device, dtype=cast, non_blocking=True)
    if isinstance(batch, tuple):
        moved = [to_device(item, device, dtype) for item in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else tuple(moved)
    if isinstance(batch, list):
        return [to_device(item, device, dtype) for item in batch]
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, dtype) for key, value in batch.items()}
    return batch


def _check_dtype(dtype: object) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES:
        return dtype
    valid = ", ".join(map(str, FLOAT_DTYPES))
    msg = (
        f"dtype must be a floating-point torch.dtype ({valid}) or None to keep the model's "
        f"and the batches' own, got {dtype!r}"
    )
    raise ConfigurationError(msg)


def _move_model(learn: Learner, device: torch.device, dtype: torch.dtype | None) -> None:
    """Move (and convert) the model, and keep the optimizer on its parameters.

    ``fit`` builds the optimizer before ``before_fit``. Moving between CPU and an
    accelerator, or converting the dtype, keeps each Parameter object (only its data
    changes), but a move to some devices ('meta', XLA) makes new Parameters, which a fresh
    optimizer must follow. An optimizer that kept state from an earlier fit (it persists
    across fits) gets that state moved and converted along with the parameters.
    """
    before = [(p, p.device, p.dtype) for p in learn.model.parameters()]
    learn.model.to(device=device, dtype=dtype)
    after = list(learn.model.parameters())
    replaced = {
        id(old): new for (old, _, _), new in zip(before, after, strict=True) if old is not new
    }
    opt = learn.opt
    if opt is None:
        return
    if replaced:
        _repoint_optimizer(opt, replaced)
    elif opt.state and any((p.device, p.dtype) != (d, t) for p, d, t in before):
        opt.load_state_dict(opt.state_dict())  # torch casts the state to each parameter's


def _repoint_optimizer(opt: torch.optim.Optimizer, replaced: Mapping[int, nn.Parameter]) -> None:
    if opt.state:
        msg = (
            "DeviceCB: moving the model replaced its parameters, but the optimizer already has "
            "state for the old ones; move the model before building the optimizer"
        )
        raise ConfigurationError(msg)
    for group in opt.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]


class DeviceCB(Callback):
    """Move the model (and a loss module) to ``device`` when a run starts, and each batch to it.

    ``device`` is anything ``torch.device`` accepts ('cuda', 'cuda:1', 'mps', 'cpu');
    None picks the first available accelerator, else the CPU. ``dtype`` (a floating-point
    ``torch.dtype``, ``torch.float64`` say) converts the model's floating-point
    parameters and buffers, and the floating-point tensors of every batch; integer tensors
    (labels, token ids) keep their dtype. Batches of any shape are moved: tensors nested
    in tuples, lists and mappings. Batches are moved with ``non_blocking=True``: no
    host-device sync (pin the DataLoader's memory to overlap the copy with compute).

    The model moves in ``before_fit``, and in ``before_epoch`` of a validate or predict
    run (which has no ``before_fit``); a move to where the model already is costs next to
    nothing. Order -20: before every other callback sees the batch.
    """

    order = -20

    def __init__(
        self, device: str | torch.device | None = None, *, dtype: torch.dtype | None = None
    ) -> None:
        """Check ``device`` and ``dtype`` now, so a typo fails when the callback is built."""
        self.device = resolve_device(device)
        self.dtype = _check_dtype(dtype)

    def before_fit(self, learn: Learner) -> None:
        """Move the model, and the loss function when it is a module (class weights).

        The run's header names the device the model had when the run started; a ``device``
        note in the audit log records where it runs.
        """
        self._place(learn)

    def before_epoch(self, learn: Learner) -> None:
        """In a validate or predict run, which has no before_fit, move the model now."""
        if learn.kind is not RunKind.FIT:
            self._place(learn)

    def before_batch(self, learn: Learner) -> None:
        """Replace ``learn.batch`` by the same batch on the device (and in the dtype)."""
        learn.batch = to_device(learn.batch, self.device, self.dtype)

    def _place(self, learn: Learner) -> None:
        _move_model(learn, self.device, self.dtype)
        if isinstance(learn.loss_func, nn.Module):
            learn.loss_func.to(device=self.device, dtype=self.dtype)
        learn.note("device", device=str(self.device))

    def __repr__(self) -> str:
        """Name the device (and dtype) besides the class and the order."""
        dtype = "" if self.dtype is None else f", dtype={self.dtype}"
        return f"DeviceCB(device={str(self.device)!r}{dtype}, order={self.order})"
