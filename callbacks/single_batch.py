"""SingleBatchCB: run one training batch, then stop the fit (a quick check of a set-up).

The first training batch that completes (forward, loss, backward, step and every
``after_batch`` hook of lower order) ends the fit through ``CancelFitException``, raised
in ``after_batch`` so that the batch itself is cancelled with the fit. A
``single_batch`` note in the audit log says why; the run's status is ``cancelled``.
Order 80: the last of the stock callbacks, so metrics and recorders see that batch.
No host-device sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsm_learner import Callback, CancelFitException

if TYPE_CHECKING:
    from fsm_learner import Learner

__all__ = ["SingleBatchCB"]


class SingleBatchCB(Callback):
    """Stop the fit after its first completed training batch."""

    order = 80

    def after_batch(self, learn: Learner) -> None:
        """After the first training batch, cancel the fit."""
        if not learn.training:
            return
        learn.note("single_batch", reason="SingleBatchCB stops after one training batch")
        msg = "SingleBatchCB: one training batch done"
        raise CancelFitException(msg)
