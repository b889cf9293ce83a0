"""MixedPrecisionCB: ``torch.autocast`` for the forward pass and the loss, and a GradScaler.

Defaults follow the model's device, read when the fit starts (after DeviceCB moved it):
on CUDA, float16 with a ``torch.amp.GradScaler``; elsewhere (CPU), bfloat16 without one.
``dtype`` and ``scaler`` override them (float16 with a scaler also runs on CPU).

Order 15, and why. Hooks and overrides share one ``order``, and for overrides a lower
order is an outer layer. Gradient accumulation (order 5) decides *whether* to step and
gradient clipping (order 8) must see unscaled gradients just before the step; mixed
precision decides *how* to back-propagate and step, so it is the innermost of the stock
overrides, after both. The autocast region does not depend on the order: it is entered in
``before_batch`` and left in ``after_loss``, so it covers the forward pass and the loss
and never the backward pass; the cancel and failure hooks leave it when a batch ends
early. Hooks of lower order in ``after_loss`` run inside the region, those of higher
order outside.

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
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Final

import torch

from fsm_learner import Callback, CancelBatchException, ConfigurationError

if TYPE_CHECKING:
    from fsm_learner import Learner
    from fsm_learner.callback import Proceed

__all__ = ["MixedPrecisionCB"]

_DTYPES: Final = (torch.float16, torch.bfloat16)


def _check_dtype(dtype: object) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _DTYPES):
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
        self._autocast: torch.autocast | None = None
        self._region = ExitStack()

    def before_fit(self, learn: Learner) -> None:
        """Choose dtype and scaler for the model's device; a fresh scaler per fit."""
        device = _device_type(learn)
        dtype = self.dtype or (torch.float16 if device == "cuda" else torch.bfloat16)
        use_scaler = self.use_scaler if self.use_scaler is not None else dtype == torch.float16
        self._autocast = torch.autocast(device, dtype=dtype)
        self.scaler = torch.amp.GradScaler(device) if use_scaler else None
        self.skipped = 0
        self._scale = None
        self._leave()

    def before_batch(self, learn: Learner) -> None:  # noqa: ARG002 (hook signature)
        """Enter the autocast region for the forward pass and the loss."""
        if self._autocast is not None:
            self._leave()  # a region left open by a batch that ended early
            self._region.enter_context(self._autocast)

    def after_loss(self, learn: Learner) -> None:  # noqa: ARG002 (hook signature)
        """Leave the autocast region: the backward pass runs outside it."""
        self._leave()

    def after_cancel_batch(self, learn: Learner) -> None:  # noqa: ARG002 (hook signature)
        """Leave the autocast region if the batch was cancelled inside it."""
        self._leave()

    def after_cancel_epoch(self, learn: Learner) -> None:  # noqa: ARG002 (hook signature)
        """Leave the autocast region if the pass was cancelled inside it."""
        self._leave()

    def after_cancel_fit(self, learn: Learner) -> None:  # noqa: ARG002 (hook signature)
        """Leave the autocast region if the fit was cancelled inside it."""
        self._leave()

    def after_fail(self, learn: Learner) -> None:  # noqa: ARG002 (hook signature)
        """Leave the autocast region if the fit failed inside it."""
        self._leave()

    def _leave(self) -> None:
        self._region.close()

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
