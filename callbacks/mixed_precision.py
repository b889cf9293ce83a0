"""MixedPrecisionCB: ``torch.autocast`` for the forward pass and the loss, and a GradScaler.

Defaults follow the model's device, read when a run starts (after DeviceCB moved it):
on CUDA, float16 with a ``torch.amp.GradScaler``; elsewhere (CPU), bfloat16 without one.
``dtype`` and ``scaler`` override them (float16 with a scaler also runs on CPU).

The autocast region is the ``predict`` and ``compute_loss`` overrides: each runs the rest
of its chain inside ``with torch.autocast(...)``, so the forward pass and the loss run in
the low precision and nothing else does: no hook (``after_predict``, ``after_loss``, ...)
and never the backward pass. A ``with`` block leaves the region however the work ends (a
cancel, an exception), so no hook has to. The autocast device and dtype are read from
the model when each pass starts, so validate and predict runs (which have no
``before_fit``) run under autocast too.

Order 15, and why. Hooks and overrides share one ``order``, and for overrides a lower
order is an outer layer. Gradient accumulation (order 5) decides *whether* to step and
gradient clipping (order 8) must see unscaled gradients just before the step; mixed
precision decides *how* to back-propagate and step, so it is the innermost of the stock
overrides, after both. ``predict`` and ``compute_loss`` overrides of higher order run
inside the autocast region, those of lower order outside it.

With a scaler:

- ``backward`` back-propagates ``scaler.scale(loss)`` (the loss it gets from the outer
  layers, so divided by GradientAccumulationCB when accumulating);
- ``step`` runs ``scaler.step(opt); scaler.update(); opt.zero_grad()`` instead of the
  default, so overrides of order above 15 do not run while a scaler is in use;
- ``unscale_gradients`` (the GradientUnscaler protocol of GradientClipCB) unscales the
  gradients before clipping;
- a step the scaler skipped (non-finite gradients) takes the cancel path: a
  ``mixed_precision_skip`` note, then ``CancelBatchException``, so the audit log shows a
  ``cancel_batch`` for it and the batch's ``after_step``/``after_batch`` do not run.

Host-device sync: a skipped step is detected by the scale shrinking in ``update``: one
``scaler.get_scale()`` (an ``.item()``) after each step, compared with the value read
after the step before. That costs no extra pipeline stall: ``GradScaler.step`` itself
reads ``found_inf`` with ``.item()`` on every step to decide whether to call
``opt.step()``. The exception is an optimizer that steps on the device under AMP (fused
Adam, ``_step_supports_amp_scaling``), where GradScaler does not sync and this check
adds one sync per step. Without a scaler there is no sync at all.

Across fits and checkpoints. The scaler's state (its scale and growth tracker) persists
across fits, as the optimizer's does: each fit builds a scaler for the model's device and
gives it the state the last one ended with, so ``fit(2); fit(2)`` scales as ``fit(4)``.
``skipped`` counts the skipped steps of the current fit. ``state_dict()`` holds
``scaler`` (``GradScaler.state_dict()``, or None without one) and ``skipped``.
``load_state_dict`` loads the scaler state into the running fit's scaler (a resumed fit,
after ``before_fit``), or, at idle, keeps it for the next fit's ``before_fit`` to give
its scaler (a ``learn.load`` in a new process, before any scaler exists). A saved scaler
state that no scaler uses (the dtype or device now needs none) is dropped with a
``ResumeWarning``; a fit without a saved state starts its scaler afresh.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Final

import torch

from callbacks._state import state_keys, state_optional, state_value
from fsm_learner import Callback, CancelBatchException, ConfigurationError
from fsm_learner.exceptions import ResumeWarning

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner
    from fsm_learner.callback import Proceed

__all__ = ["MixedPrecisionCB"]

_DTYPES: Final = (torch.float16, torch.bfloat16)


def _check_dtype(dtype: object) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES:
        return dtype
    msg = f"dtype must be torch.float16, torch.bfloat16 or None (from the device), got {dtype!r}"
    raise ConfigurationError(msg)


def _check_scaler(scaler: object) -> bool | None:
    if scaler is None or isinstance(scaler, bool):
        return scaler
    msg = f"scaler must be True, False or None (float16 only), got {scaler!r}"
    raise ConfigurationError(msg)


def _device_type(learn: Learner) -> str:
    param = next(learn.model.parameters(), None)
    return "cpu" if param is None else param.device.type


class MixedPrecisionCB(Callback):
    """Run forward pass and loss under ``torch.autocast``; scale float16 gradients."""

    order = 15

    def __init__(self, *, dtype: torch.dtype | None = None, scaler: bool | None = None) -> None:
        """``dtype``: float16 or bfloat16, default from the device; ``scaler``: default float16."""
        self.dtype = _check_dtype(dtype)
        self.use_scaler = _check_scaler(scaler)
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped = 0
        self._scale: float | None = None
        self._autocast: tuple[str, torch.dtype] | None = None
        self._carried: dict[str, Any] | None = None
        """The scaler state the next fit's scaler starts from (None: a fresh scaler)."""
        self._fitting = False

    def _settings(self, learn: Learner) -> tuple[str, torch.dtype]:
        """Return the autocast device type and dtype for the model where it is now."""
        device = _device_type(learn)
        return device, self.dtype or (torch.float16 if device == "cuda" else torch.bfloat16)

    def before_fit(self, learn: Learner) -> None:
        """Build the scaler for the model's device and dtype, from the last fit's state."""
        device, dtype = self._settings(learn)
        use_scaler = self.use_scaler if self.use_scaler is not None else dtype == torch.float16
        carried = self._carried if self.scaler is None else self.scaler.state_dict()
        self.scaler = torch.amp.GradScaler(device) if use_scaler else None
        self._carried = None
        if carried:
            self._give_scaler(carried)
        self.skipped = 0
        self._scale = None
        self._fitting = True

    def _give_scaler(self, state: dict[str, Any]) -> None:
        if self.scaler is None:
            warnings.warn(
                "MixedPrecisionCB: a GradScaler state was saved, but this fit uses no scaler "
                "(its dtype or device needs none): the state is dropped",
                ResumeWarning,
                stacklevel=2,
            )
            return
        self.scaler.load_state_dict(state)
        self._scale = None

    def state_dict(self) -> dict[str, Any]:
        """Return the scaler's state (None without one) and the steps skipped in this fit."""
        state = self._carried if self.scaler is None else self.scaler.state_dict()
        return {"scaler": state or None, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load the scaler state now (in a fit), or keep it for the next fit's scaler."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("scaler", "skipped"))
        scaler = state_optional(owner, state, "scaler", dict, "a dict (GradScaler.state_dict)")
        skipped = state_value(owner, state, "skipped", int, "an int (steps skipped)")
        if scaler is not None:
            state_keys(f"{owner} scaler", scaler, ("scale", "_growth_tracker"))
        if not self._fitting and self.scaler is None:  # no scaler yet: the next fit's
            self._carried = scaler
        elif scaler is not None:
            self._give_scaler(scaler)
        self.skipped = skipped

    def cleanup_fit(self, learn: Learner) -> None:
        """End the fit, however it ended: a state loaded from now on is for the next fit."""
        self._fitting = False

    def before_epoch(self, learn: Learner) -> None:
        """Read the autocast settings off the model, in every kind of run."""
        self._autocast = self._settings(learn)

    def predict(self, learn: Learner, proceed: Proceed) -> None:
        """Run the forward pass (the rest of the chain) under autocast."""
        self._under_autocast(learn, proceed)

    def compute_loss(self, learn: Learner, proceed: Proceed) -> None:
        """Compute the loss (the rest of the chain) under autocast."""
        self._under_autocast(learn, proceed)

    def _under_autocast(self, learn: Learner, proceed: Proceed) -> None:
        device, dtype = self._autocast or self._settings(learn)
        with torch.autocast(device, dtype=dtype):
            proceed()

    def backward(self, learn: Learner, proceed: Proceed) -> None:
        """With a scaler, back-propagate the scaled loss; without, run the rest of the chain."""
        if self.scaler is None:
            proceed()
            return
        torch.autograd.backward(self.scaler.scale(learn.loss))

    def step(self, learn: Learner, proceed: Proceed) -> None:
        """With a scaler, step through it and cancel the batch if it skipped the step."""
        scaler, opt = self.scaler, learn.opt
        if scaler is None or opt is None:
            proceed()
            return
        before = scaler.get_scale() if self._scale is None else self._scale
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        after = self._scale = scaler.get_scale()  # only update() changes it
        if after < before:
            self._skip(learn, before, after)

    def unscale_gradients(self, learn: Learner) -> None:
        """Unscale the gradients in place (before clipping); a no-op without a scaler."""
        if self.scaler is not None and learn.opt is not None:
            self.scaler.unscale_(learn.opt)

    def _skip(self, learn: Learner, before: float, after: float) -> None:
        self.skipped += 1
        learn.note(
            "mixed_precision_skip",
            reason="non-finite gradients: the GradScaler skipped the optimizer step",
            scale=before,
            new_scale=after,
        )
        msg = f"GradScaler skipped the step (non-finite gradients); scale {before:g} -> {after:g}"
        raise CancelBatchException(msg)
