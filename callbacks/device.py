"""DeviceCB: put the model and every batch on one device, without a host-device sync.

This module owns the device checks the stock callbacks share: ``resolve_device`` turns a
device string into a ``torch.device`` or a ``ConfigurationError`` that names what torch
knows and what is available here, ``default_device`` picks the first available
accelerator, and ``to_device`` moves a batch (tensors in tuples, lists and dicts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import nn

from fsm_learner import Callback, ConfigurationError

if TYPE_CHECKING:
    from fsm_learner import Learner

__all__ = ["DeviceCB", "available_device_types", "default_device", "resolve_device", "to_device"]

_DEVICE_TYPES: Final = ("cpu", "cuda", "mps", "xpu", "meta")
"""The device types error messages offer; torch knows more (its message is chained)."""
_ACCELERATORS: Final = ("cuda", "mps", "xpu")
"""The accelerators ``default_device`` tries, in this order."""


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


def to_device(batch: Any, device: torch.device) -> Any:
    """Return ``batch`` with every tensor moved to ``device`` (``non_blocking``, no sync).

    Tuples (named ones too), lists and mappings are rebuilt around the moved tensors;
    anything else is returned as it is.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        moved = [to_device(item, device) for item in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else tuple(moved)
    if isinstance(batch, list):
        return [to_device(item, device) for item in batch]
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def _move_model(learn: Learner, device: torch.device) -> None:
    """Move the model, and repoint the optimizer when the move replaced parameters.

    ``fit`` builds the optimizer before ``before_fit``. Moving between CPU and an
    accelerator keeps each Parameter object (only its data changes), but a move to some
    devices ('meta', XLA) makes new Parameters, which the fresh optimizer must follow.
    """
    before = list(learn.model.parameters())
    learn.model.to(device)
    replaced = {
        id(old): new
        for old, new in zip(before, learn.model.parameters(), strict=True)
        if old is not new
    }
    if replaced and learn.opt is not None:
        _repoint_optimizer(learn.opt, replaced)


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
    """Move the model (and a loss module) to ``device`` at fit start, and each batch to it.

    ``device`` is anything ``torch.device`` accepts ('cuda', 'cuda:1', 'mps', 'cpu');
    None picks the first available accelerator, else the CPU. Batches are moved with
    ``non_blocking=True``: no host-device sync (pin the DataLoader's memory to overlap
    the copy with compute). Order -20: before every other callback sees the batch.
    """

    order = -20

    def __init__(self, device: str | torch.device | None = None) -> None:
        """Check ``device`` now, so a typo fails when the callback is built."""
        self.device = resolve_device(device)

    def before_fit(self, learn: Learner) -> None:
        """Move the model, and the loss function when it is a module (class weights).

        The run's header names the device the model had when the fit started; a ``device``
        note in the audit log records where it trains.
        """
        _move_model(learn, self.device)
        if isinstance(learn.loss_func, nn.Module):
            learn.loss_func.to(self.device)
        learn.note("device", device=str(self.device))

    def before_batch(self, learn: Learner) -> None:
        """Replace ``learn.batch`` by the same batch on the device."""
        learn.batch = to_device(learn.batch, self.device)

    def __repr__(self) -> str:
        """Name the device besides the class and the order."""
        return f"DeviceCB(device={str(self.device)!r}, order={self.order})"
