"""What a batch holds, and what a model returns: the loop's only assumptions about data.

A batch is one of three shapes, as fastai and Hugging Face use them:

- a tuple or list: every element but the last is an input, the last is the target
  (``model(*inputs)``, ``loss_func(preds, target)``); one element alone is an input
  without a target;
- a mapping: the model is called with the mapping less its target key as keyword
  arguments (``model(**inputs)``), and the target is ``batch[target_key]`` when present;
- anything else (a tensor, say): the input, without a target.

With ``loss_func=None`` the model computes its own loss: it receives the whole batch
(target included) and its output carries the loss as ``out.loss`` or ``out["loss"]``;
the predictions are ``out.logits`` / ``out["logits"]`` where present, else the output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import torch

from fsm_learner._display import safe_text
from fsm_learner.exceptions import InvalidBatchError

__all__ = [
    "DEFAULT_TARGET_KEY",
    "batch_size",
    "batch_target",
    "model_args",
    "output_loss",
    "output_preds",
]

DEFAULT_TARGET_KEY: Final = "labels"
"""The target's key in a mapping batch, as Hugging Face names it."""

_Args = tuple[tuple[Any, ...], Mapping[str, Any]]


def _is_sequence(batch: object) -> bool:
    return isinstance(batch, tuple | list)


def model_args(batch: Any, target_key: str, *, whole: bool = False) -> _Args:
    """Return the positional and keyword arguments the model is called with.

    ``whole`` passes the target too: the model computes its own loss.
    """
    if isinstance(batch, Mapping):
        if whole:
            return (), batch
        return (), {k: v for k, v in batch.items() if k != target_key}
    if _is_sequence(batch):
        if not batch:
            msg = "a batch is an empty tuple or list; a batch holds at least one input"
            raise InvalidBatchError(msg)
        return (tuple(batch) if whole or len(batch) == 1 else tuple(batch[:-1])), {}
    return (batch,), {}


def batch_target(batch: Any, target_key: str) -> Any:
    """Return the batch's target, or None when it has none."""
    if isinstance(batch, Mapping):
        return batch.get(target_key)
    if _is_sequence(batch) and len(batch) > 1:
        return batch[-1]
    return None


def batch_size(batch: Any, target_key: str) -> int:
    """Return the number of samples in a batch: the length of its target, else of an input."""
    target = batch_target(batch, target_key)
    if target is not None:
        return _length(target)
    args, kwargs = model_args(batch, target_key)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor | Sequence):
            return _length(value)
    return 1


def _length(value: Any) -> int:
    """Count the samples in a target or an input.

    A tensor holds ``shape[0]``; a mapping, or a tuple or list of tensors, holds fields
    of the same samples (``(ya, yb)``, ``{"a": ya, "b": yb}``): its first field counts;
    any other sized value (a list of labels, a tuple of per-sample dicts as detection
    targets are) holds one sample per element.
    """
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.ndim else 1
    if isinstance(value, Mapping):
        return _length(next(iter(value.values()))) if value else 1
    if _is_sequence(value) and value and isinstance(value[0], torch.Tensor | tuple | list):
        return _length(value[0])
    try:
        return len(value)
    except TypeError:
        return 1


def _part(output: Any, name: str) -> Any:
    """``output.<name>`` or ``output[name]``, whichever the output has; None otherwise.

    A named tuple's fields count (``Out(loss, logits)``); a plain tuple has no names.
    """
    if isinstance(output, Mapping):
        return output.get(name)
    if isinstance(output, torch.Tensor | list) or (
        isinstance(output, tuple) and not hasattr(output, "_fields")
    ):
        return None
    return getattr(output, name, None)


def output_loss(output: Any, hint: str = "") -> torch.Tensor:
    """Return the loss a model computed: ``output.loss`` or ``output["loss"]``.

    ``hint`` ends the error message when there is none (what the batch lacked, say).
    """
    loss = _part(output, "loss")
    if not isinstance(loss, torch.Tensor):
        got = "no loss" if loss is None else f"a loss of type {type(loss).__name__}"
        if isinstance(output, tuple) and not hasattr(output, "_fields"):
            got += " (a plain tuple has no names: return a named tuple, a dict or an object)"
        msg = (
            f"loss_func=None: the model computes its own loss, but its output "
            f"({safe_text(type(output).__name__, 80)}) has {got}; return an object with a "
            f"tensor .loss or a mapping with a tensor 'loss' (include the target in the "
            f"batch), or give the Learner a loss_func{hint}"
        )
        raise InvalidBatchError(msg)
    return loss


def output_preds(output: Any) -> Any:
    """Return the predictions in a model's output: its logits where present, else itself."""
    logits = _part(output, "logits")
    return output if logits is None else logits
