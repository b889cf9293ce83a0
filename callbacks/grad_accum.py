"""GradientAccumulationCB: step the optimizer once every ``n_batches`` training batches.

It owns the *whether* of a step, through both overrides (order 5: an outer layer, so the
step overrides of higher order, GradientClipCB's and MixedPrecisionCB's, run only when it
steps, and MixedPrecisionCB's backward scales the loss this callback divided):

- ``backward`` divides ``learn.loss`` by the size of the batch's group before the rest
  of the chain computes gradients, then puts the unscaled loss back, so that the hooks
  that follow (metrics, recorders) see the loss of the batch itself;
- ``step`` runs the rest of the chain (the step) only on the last batch of a group.

Groups are the batch indices ``0..k-1``, ``k..2k-1``, ... of each training pass. With a
data loader that has ``len()``, the last group may be shorter (``n % k`` batches): its
losses are divided by its own size and it steps at the last batch, so every group's step
follows the mean gradient of its batches, exactly as one batch of their union would
(with a mean-reduced loss and equal batch sizes). With a data loader that has no
``len()``, a short last group cannot be known in advance and its gradients are dropped.
Gradients are zeroed at the start of every training pass, so nothing left over from a
short group leaks into the next pass.

Cancelled batches (``CancelBatchException``, or a cancelled pass or fit) never leak
gradients into a later step. When a training batch ends (``cleanup_batch``, by any
route) without having reached its ``step`` transition:

- a batch cancelled before its backward contributes nothing: its group steps with the
  gradients of its other batches (each still divided by the group's size);
- a batch cancelled after its backward (in ``after_backward``, or inside the backward
  chain) has added its gradient, which cannot be told apart from those of the group's
  earlier batches: the gradients are zeroed, so the group loses what it had accumulated
  so far, and its later batches still step at the group's close;
- a batch that closes its group and is cancelled before the step ran drops its group:
  the gradients are zeroed, the group takes no step, and the next group starts from zero
  (as a short last group without ``len()`` is dropped).

A batch cancelled after its step (in ``after_step`` or ``after_batch``) has contributed,
as it would have without accumulation.

``after_step`` still fires on every training batch (the ``step`` transition is taken);
the weights change only when a group steps. ``optimizer_steps(n)`` says how many steps a
pass of ``n`` batches takes (``ceil(n / k)``): BatchSchedCB sizes its schedules with it.
No host-device sync.

Checkpoints. Where a group stands follows from the batch index (``learn.iter``), which
the learner restores, and the accumulated ``.grad`` tensors are the learner's to save
and put back (after ``before_epoch``, which zeroes them). ``state_dict()`` holds
``n_batches`` and ``open_group``, whether the checkpoint was taken inside a group whose
step is still to come: loading such a state into a callback with another ``n_batches``
raises ``CheckpointError`` (the gradients saved were divided by the other group size,
and the group would close elsewhere). Between groups and passes, and at idle, another
``n_batches`` is fine: the next fit accumulates as it is told.
"""

from __future__ import annotations

import math
from collections.abc import Sized
from typing import TYPE_CHECKING, Any

from callbacks._checks import check_count
from callbacks._state import state_keys, state_value
from fsm_learner import Callback
from fsm_learner.exceptions import CheckpointError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner
    from fsm_learner.callback import Proceed

__all__ = ["GradientAccumulationCB"]


class GradientAccumulationCB(Callback):
    """Accumulate the gradients of ``n_batches`` training batches per optimizer step."""

    order = 5

    def __init__(self, n_batches: int) -> None:
        """``n_batches`` >= 1 training batches per step (1 steps every batch)."""
        self.n_batches = check_count(
            "n_batches", n_batches, minimum=1, meaning="batches per optimizer step"
        )
        self._n_in_pass: int | None = None
        self._backward_began = False
        """Whether the current batch's backward began (its gradient may be in ``.grad``)."""
        self._reached_step = False
        """Whether the current batch got through its ``step`` work (stepped or not)."""
        self._open_group = False
        """Whether the last training batch that ended left its group's step to come."""

    def before_epoch(self, learn: Learner) -> None:
        """At the start of a training pass: learn its length, if any, and zero the gradients."""
        if not learn.training:
            return
        self._open_group = False
        self._n_in_pass = len(learn.dl) if isinstance(learn.dl, Sized) else None
        if learn.opt is not None:
            learn.opt.zero_grad()

    def optimizer_steps(self, n_batches: int) -> int:
        """How many optimizer steps a training pass of ``n_batches`` batches takes.

        One per group of ``n_batches`` batches, the shorter last group included.
        """
        return math.ceil(n_batches / self.n_batches)

    def group_size(self, index: int) -> int:
        """How many batches share the step of the batch at ``index`` in the pass."""
        k, n = self.n_batches, self._n_in_pass
        if n is not None and index >= n - n % k:
            return n % k
        return k

    def closes_group(self, index: int) -> bool:
        """Whether the batch at ``index`` is the last of its group (the one that steps)."""
        n = self._n_in_pass
        return (index + 1) % self.n_batches == 0 or (n is not None and index == n - 1)

    def backward(self, learn: Learner, proceed: Proceed) -> None:
        """Back-propagate the loss divided by the group size; leave the loss unscaled."""
        loss = learn.loss
        learn.loss = loss / self.group_size(learn.iter)
        self._backward_began = True
        try:
            proceed()
        finally:
            learn.loss = loss

    def step(self, learn: Learner, proceed: Proceed) -> None:
        """Run the step (the rest of the chain) only on the last batch of a group."""
        if self.closes_group(learn.iter):
            proceed()
        self._reached_step = True

    def cleanup_batch(self, learn: Learner) -> None:
        """Zero the gradients a batch that missed its step leaves behind (see the module doc)."""
        leaked = self._leaves_gradients(learn)
        if learn.training:
            self._open_group = not self.closes_group(learn.iter)
        self._backward_began = self._reached_step = False
        if leaked and learn.opt is not None:
            learn.opt.zero_grad()

    def cleanup_epoch(self, learn: Learner) -> None:
        """Close the last group when a training pass ends (it stepped or is dropped)."""
        if learn.training:
            self._open_group = False

    def state_dict(self) -> dict[str, Any]:
        """Return ``n_batches`` and whether a group's step is still to come."""
        return {"n_batches": self.n_batches, "open_group": self._open_group}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that an open group goes on with the same ``n_batches`` (see the module doc)."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("n_batches", "open_group"))
        n_batches = state_value(owner, state, "n_batches", int, "an int (batches per step)")
        open_group = state_value(owner, state, "open_group", bool, "a bool")
        if open_group and n_batches != self.n_batches:
            msg = (
                f"{owner}: the checkpoint was taken inside a group of n_batches={n_batches} "
                f"batches, this callback has n_batches={self.n_batches}: resume with "
                f"n_batches={n_batches} (the saved gradients were divided by its groups)"
            )
            raise CheckpointError(msg)
        self._open_group = open_group

    def _leaves_gradients(self, learn: Learner) -> bool:
        """Whether the batch ending now left gradients that no step of its group may use."""
        if not learn.training or self._reached_step:
            return False
        return self._backward_began or self.closes_group(learn.iter)
