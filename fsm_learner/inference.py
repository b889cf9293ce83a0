"""What validate and get_preds gather from their runs, batch by batch, without a sync.

``Learner.validate`` hands each completed batch to a ``LossMean``, ``Learner.get_preds`` to
a ``Gathered``; both keep tensors on their device until the run ends, then read them back
once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fsm_learner._display import safe_text
from fsm_learner.batch import batch_size
from fsm_learner.exceptions import InvalidBatchError

if TYPE_CHECKING:
    from fsm_learner.learner import Learner

__all__ = ["Gathered", "LossMean"]

_NAN = math.nan


class LossMean:
    """The mean loss over samples of a validate run, summed on the device (no sync per batch)."""

    def __init__(self, target_key: str) -> None:
        """Start from nothing; ``target_key`` finds the target that counts the samples."""
        self._target_key = target_key
        self._sum: torch.Tensor | None = None
        self._count = 0

    def add(self, learn: Learner) -> None:
        """Add the completed batch's loss, weighted by its samples."""
        loss = learn.loss
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            msg = (
                f"validate() averages the batches' losses, so a loss must be a scalar tensor "
                f"(the batch's mean), got {shape}; use a loss with reduction='mean'"
            )
            raise InvalidBatchError(msg)
        n = batch_size(learn.batch, self._target_key)
        weighted = loss.detach().reshape(()).double() * n
        self._sum = weighted if self._sum is None else self._sum + weighted
        self._count += n

    def value(self) -> float:
        """Return the mean over samples (NaN when no batch completed): one read."""
        if self._sum is None or not self._count:
            return _NAN
        return float(self._sum / self._count)


class Gathered:
    """The predictions and targets of a predict run, kept on their device until the end."""

    def __init__(self, target_key: str) -> None:
        """Start from nothing; ``target_key`` finds the targets of mapping batches."""
        self._target_key = target_key
        self._preds: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._without_target = 0

    def add(self, learn: Learner) -> None:
        """Keep the completed batch's predictions and target (detached, on their device)."""
        preds = learn.preds
        if not isinstance(preds, torch.Tensor):
            msg = (
                f"get_preds() concatenates the batches' predictions, so learn.preds must be a "
                f"tensor, got {safe_text(type(preds).__name__, 80)}; return a tensor from the "
                f"model (or one with .logits), or set learn.preds to one in after_predict"
            )
            raise InvalidBatchError(msg)
        self._preds.append(_same_shape(self._preds, preds.detach(), "predictions", learn.iter))
        target = learn.target
        if isinstance(target, torch.Tensor):
            self._targets.append(_same_shape(self._targets, target.detach(), "targets", learn.iter))
        else:
            self._without_target += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the predictions and targets concatenated on the CPU (targets None if any lack)."""
        preds = torch.cat(self._preds).cpu() if self._preds else torch.empty(0)
        if self._without_target or not self._targets:
            return preds, None
        return preds, torch.cat(self._targets).cpu()


def _same_shape(kept: list[torch.Tensor], new: torch.Tensor, what: str, index: int) -> torch.Tensor:
    """Return ``new`` if it concatenates with ``kept`` along dim 0; refuse it otherwise."""
    if not new.ndim:
        msg = (
            f"get_preds() concatenates the batches' {what} along their first dimension, but "
            f"batch {index} gave a 0-d tensor (one value for the whole batch); return one "
            f"value per sample, shape [batch, ...]"
        )
        raise InvalidBatchError(msg)
    if not kept or new.shape[1:] == kept[0].shape[1:]:
        return new
    first = kept[0]
    msg = (
        f"get_preds() concatenates the batches' {what} along their first dimension, but "
        f"batch {index} gave shape {list(new.shape)} where the first gave {list(first.shape)}; "
        f"all but the first dimension must agree (pad to one length in the model, or in a "
        f"predict override), and a scalar per batch cannot be concatenated"
    )
    raise InvalidBatchError(msg)
