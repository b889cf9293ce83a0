"""GradientClipCB: clip the gradient norm just before each optimizer step.

It clips in the ``step`` override, not in ``after_backward``: with GradientAccumulationCB
(order 5, an outer layer) it then runs only when a group steps and clips the accumulated
gradient, not each partial sum; and it runs before MixedPrecisionCB's step (order 15, an
inner layer), as ``torch.amp`` wants: gradients scaled by a GradScaler must be unscaled
before clipping. For that, any callback meeting the ``GradientUnscaler`` protocol (as
MixedPrecisionCB does) is asked to unscale the gradients first.

``torch.nn.utils.clip_grad_norm_`` returns the total norm as a tensor; it is kept as
``last_norm`` without ``.item()``, so clipping forces no host-device sync.

Checkpoints: ``state_dict()`` holds ``last_norm`` (the tensor, or None): it decides
nothing, but a fit resumed after its last step ends with the same value to read.
``before_fit`` clears it, so at idle it is there to read until the next fit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from callbacks._checks import check_number
from callbacks._state import state_keys, state_optional
from fsm_learner import Callback

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner
    from fsm_learner.callback import Proceed

__all__ = ["GradientClipCB", "GradientUnscaler"]


@runtime_checkable
class GradientUnscaler(Protocol):
    """A callback whose gradients may be scaled, and which can unscale them before a step."""

    def unscale_gradients(self, learn: Learner) -> None:
        """Bring ``.grad`` back to true scale; at most once per optimizer step."""
        ...  # pragma: no cover (protocol)


class GradientClipCB(Callback):
    """Clip the total ``norm_type`` norm of the model's gradients to ``max_norm``."""

    order = 8

    def __init__(self, max_norm: float = 1.0, *, norm_type: float = 2.0) -> None:
        """``max_norm`` > 0 and finite; ``norm_type`` > 0 (``math.inf`` for the max norm)."""
        self.max_norm = check_number("max_norm", max_norm, strict=True)
        self.norm_type = check_number("norm_type", norm_type, strict=True, finite=False)
        self.last_norm: torch.Tensor | None = None
        self._unscalers: list[GradientUnscaler] = []

    def before_fit(self, learn: Learner) -> None:
        """Find the callbacks that scale gradients, once per fit."""
        self._unscalers = [cb for cb in learn.cbs if isinstance(cb, GradientUnscaler)]
        self.last_norm = None

    def state_dict(self) -> dict[str, Any]:
        """Return the last step's total norm (a tensor, or None before a step)."""
        return {"last_norm": self.last_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back ``last_norm``."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("last_norm",))
        self.last_norm = state_optional(owner, state, "last_norm", torch.Tensor, "a 0-d tensor")

    def step(self, learn: Learner, proceed: Proceed) -> None:
        """Unscale if needed, clip, then run the step."""
        for unscaler in self._unscalers:
            unscaler.unscale_gradients(learn)
        self.last_norm = torch.nn.utils.clip_grad_norm_(
            learn.model.parameters(),
            self.max_norm,
            norm_type=self.norm_type,
        )
        proceed()
