"""The default work of a batch: predict, compute the loss, backward, step.

Callbacks wrap these through the overrides of the same names (``Callback.predict``,
``compute_loss``, ``backward``, ``step``); ``DEFAULT_WORK`` is the innermost link of each
chain. They read and set the learner's public batch state only.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import torch

from fsm_learner._compat import add_note
from fsm_learner._display import safe_text
from fsm_learner.batch import batch_target, model_args, output_loss, output_preds
from fsm_learner.callback import HookCall, Override
from fsm_learner.exceptions import InvalidBatchError, InvalidTransitionError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from torch import nn

    from fsm_learner.learner import Learner

__all__ = ["DEFAULT_WORK"]


_PAIR: Final = (tuple, list)
"""Batches of these two types with two elements are ``(x, y)``: the fast path."""


def _default_predict(learn: Learner) -> None:
    batch = learn.batch
    try:
        if type(batch) in _PAIR and len(batch) == 2 and learn.loss_func is not None:
            output = learn.model(batch[0])  # (x, y): the fast path
        else:
            args, kwargs = _model_args(learn)
            output = learn.model(*args, **kwargs)
    except RuntimeError as exc:
        args, kwargs = _model_args(learn)
        _note_dtype_mismatch(exc, learn.model, _tensors((*args, *kwargs.values())))
        raise
    except TypeError as exc:
        args, kwargs = _model_args(learn)
        _note_call(exc, learn, args, kwargs)
        raise
    learn.output = output
    learn.preds = output if type(output) is _TENSOR else output_preds(output)


_TENSOR: Final = torch.Tensor


def _model_args(learn: Learner) -> tuple[tuple[Any, ...], Mapping[str, Any]]:
    """Return the model's arguments: with ``loss_func=None`` the whole batch, target included."""
    return model_args(learn.batch, learn.target_key, whole=learn.loss_func is None)


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Yield the tensors in ``values``, at any depth of tuples, lists and mappings."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, tuple | list):
            yield from _tensors(value)
        elif isinstance(value, Mapping):
            yield from _tensors(value.values())


def _note_call(
    exc: TypeError, learn: Learner, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> None:
    """Say how the batch became the model's arguments when the call did not fit them."""
    called = ", ".join([*(f"<{type(a).__name__}>" for a in args), *(f"{k}=..." for k in kwargs)])
    whole = " (loss_func=None: the whole batch, target included)" if learn.loss_func is None else ""
    add_note(
        exc,
        f"fsm_learner: the model was called as model({safe_text(called, 300)}) from a "
        f"{safe_text(type(learn.batch).__name__, 80)} batch{whole}: a tuple or list batch "
        f"gives its elements but the last as positional inputs, a mapping batch its keys "
        f"but target_key={learn.target_key!r} as keyword inputs; override predict in a "
        f"callback to call the model otherwise",
    )


def _note_dtype_mismatch(exc: RuntimeError, model: nn.Module, inputs: Iterable[Any]) -> None:
    """Say so when the model's floating dtype differs from its inputs' (a bare dtype error)."""
    weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
    given = {x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()}
    if len(weights) == 1 and given and given != weights:
        (dtype,) = weights
        add_note(
            exc,
            f"fsm_learner: the model's parameters are {dtype} but the batch's inputs are "
            f"{', '.join(sorted(map(str, given)))}; pass callbacks.DeviceCB(dtype={dtype}) "
            f"to convert the batches, or convert the model",
        )


def _default_loss(learn: Learner) -> None:
    loss_func = learn.loss_func
    if loss_func is None:
        learn.loss = output_loss(learn.output, _missing_target(learn))
        return
    batch = learn.batch
    if type(batch) in _PAIR and len(batch) == 2:  # (x, y): the fast path
        target = batch[1]
    else:
        target = batch_target(batch, learn.target_key)
    if target is None:
        msg = (
            f"loss_func needs a target, but the batch ({_describe(batch)}) has none: a "
            f"tuple or list batch holds its target last, a mapping batch under "
            f"target_key={learn.target_key!r}; or give loss_func=None for a model that "
            f"computes its own loss"
        )
        raise InvalidBatchError(msg)
    try:
        learn.loss = loss_func(learn.preds, target)
    except (TypeError, AttributeError) as exc:
        _note_preds(exc, learn.preds)
        raise


def _note_preds(exc: Exception, preds: Any) -> None:
    """Say what ``learn.preds`` was when loss_func could not read it (not a tensor)."""
    if isinstance(preds, torch.Tensor):
        return
    add_note(
        exc,
        f"fsm_learner: loss_func got learn.preds = the model's output, a "
        f"{safe_text(type(preds).__name__, 80)} (an output with .logits or a 'logits' key "
        f"gives its logits; other outputs are passed as they are): return a tensor, or "
        f"logits, or set learn.preds in after_predict",
    )


def _describe(batch: Any) -> str:
    """Name a batch's type, and a mapping's keys."""
    kind = safe_text(type(batch).__name__, 80)
    if isinstance(batch, Mapping):
        keys = ", ".join(repr(safe_text(k, 40)) for k in list(batch)[:12])
        return f"a {kind} with keys {keys}" if keys else f"an empty {kind}"
    if isinstance(batch, tuple | list):
        return f"a {kind} of {len(batch)}"
    return f"a {kind}"


def _missing_target(learn: Learner) -> str:
    """Say what the batch lacks when a model computing its own loss returned none."""
    batch = learn.batch
    if isinstance(batch, Mapping) and learn.target_key not in batch:
        return (
            f"; the batch ({_describe(batch)}) has no target_key={learn.target_key!r}, "
            f"which such models need to compute a loss"
        )
    return ""


def _default_backward(learn: Learner) -> None:
    loss = learn.loss
    try:
        torch.autograd.backward(loss)
    except RuntimeError as exc:
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            add_note(
                exc,
                f"fsm_learner: learn.loss has shape {list(loss.shape)}; backward needs a scalar "
                f"loss (the batch's mean: reduction='mean')",
            )
        raise


def _default_step(learn: Learner) -> None:
    opt = learn.opt
    if opt is None:  # pragma: no cover (fit builds the optimizer before any batch)
        msg = "no optimizer: fit() builds it from opt_func before the first batch"
        raise InvalidTransitionError(msg)
    opt.step()
    opt.zero_grad()


DEFAULT_WORK: Final[Mapping[Override, HookCall]] = MappingProxyType(
    {
        Override.PREDICT: _default_predict,
        Override.COMPUTE_LOSS: _default_loss,
        Override.BACKWARD: _default_backward,
        Override.STEP: _default_step,
    }
)
