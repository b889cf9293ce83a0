"""TerminateOnNaNCB: a non-finite loss (NaN or infinite) cancels the fit.

The check runs in ``after_loss``, so a non-finite training loss stops the fit *before*
its backward pass and step: the weights stay those of the last good step. Validation
losses are checked too (a non-finite loss is one, whichever the pass), and those of a
validate run, which it cancels the same way; a predict run computes no loss. Before the
``CancelFitException``, a ``terminate_on_nan`` note in the audit log says why: the
reason, the pass, the epoch and batch index, and the loss.

Host-device sync: this callback's job needs one. Deciding on the host whether a loss on
the device is finite means reading it back, once per check. By default it checks every
batch (``check_every=1``): that is what keeps the weights finite, and on CPU it costs
nothing. ``check_every=N`` instead folds the finiteness of each loss into a flag that
stays on the device (no sync) and reads the flag once every N batches and at the end of
each pass; the fit then stops up to N - 1 batches late (the note says how many batches
the flag covered), and those batches may have stepped with non-finite gradients.

Checkpoints: ``state_dict()`` holds what the flag covers between two reads, ``unchecked``
(losses folded in since the last read) and ``nonfinite`` (whether one of them was not
finite: reading it is one sync, when the checkpoint is taken); with ``check_every=1``
both are always empty between batches. Loaded after ``before_epoch``, the next read
covers the same losses as in the uninterrupted fit; at idle, the next fit starts empty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from callbacks._checks import check_count
from callbacks._state import state_keys, state_value
from callbacks.metrics import pass_name
from fsm_learner import Callback, CancelFitException
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner

__all__ = ["TerminateOnNaNCB"]


class TerminateOnNaNCB(Callback):
    """Cancel the fit at the first non-finite loss, checked every ``check_every`` batches."""

    order = 45

    def __init__(self, *, check_every: int = 1) -> None:
        """``check_every`` >= 1: batches between two reads of the device-side flag."""
        self.check_every = check_count(
            "check_every", check_every, minimum=1, meaning="batches per check"
        )
        self._flag: torch.Tensor | None = None
        self._unchecked = 0

    def before_fit(self, learn: Learner) -> None:
        """Start the fit with nothing to check."""
        self._flag, self._unchecked = None, 0

    def before_epoch(self, learn: Learner) -> None:
        """Start a validate run (which has no before_fit) with nothing to check."""
        if learn.kind is not RunKind.FIT:
            self._flag, self._unchecked = None, 0

    def after_loss(self, learn: Learner) -> None:
        """Fold this loss into the flag; read the flag every ``check_every`` batches."""
        bad = torch.logical_not(torch.isfinite(learn.loss.detach()).all())
        self._flag = bad if self._flag is None else self._flag | bad
        self._unchecked += 1
        if self._unchecked >= self.check_every:
            self._check(learn)

    def after_epoch(self, learn: Learner) -> None:
        """Read what is left of the flag at the end of each pass."""
        if self._flag is not None:
            self._check(learn)

    def state_dict(self) -> dict[str, Any]:
        """Return the losses folded in since the last read, and whether one was not finite."""
        flag = self._flag
        return {"unchecked": self._unchecked, "nonfinite": flag is not None and bool(flag)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back the unread flag (after ``before_epoch`` when resuming mid-pass)."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("unchecked", "nonfinite"))
        unchecked = state_value(owner, state, "unchecked", int, "an int (losses not read)")
        nonfinite = state_value(owner, state, "nonfinite", bool, "a bool")
        self._unchecked = unchecked
        self._flag = torch.tensor(nonfinite) if unchecked else None

    def _check(self, learn: Learner) -> None:
        flag, covered = self._flag, self._unchecked
        self._flag, self._unchecked = None, 0
        if flag is None or not bool(flag):  # the one sync per check
            return
        learn.note(
            "terminate_on_nan",
            reason="non-finite loss",
            loss=float(learn.loss.detach().float().mean()),
            batches_checked=covered,
        )
        where = (
            f"the {pass_name(learn.training)} pass of epoch {learn.epoch}"
            if learn.kind is RunKind.FIT
            else f"a {learn.kind} run"
        )
        msg = f"non-finite loss in {where}, at or before batch {learn.iter}"
        raise CancelFitException(msg)
