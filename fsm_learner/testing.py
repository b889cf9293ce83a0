"""Helpers for testing code that uses fsm_learner: record what the loop did, assert it whole.

``RecordingCallback`` implements every hook and appends one ``HookRecord`` per call, so
a test can compare the whole trace at once::

    rec = RecordingCallback()
    Learner(model, dls, loss, lr, cbs=[rec]).fit(1)
    assert [r.hook for r in rec.records] == ["before_fit", "before_epoch", ...]

``HostReads`` counts the calls that read a tensor's value back to the host, each a
device sync on a GPU, so a test can show a callback costs none per batch::

    with HostReads() as reads:
        learn.fit(1)
    assert reads.count == 0

Library code never imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from torch.overrides import TorchFunctionMode

from fsm_learner.callback import Callback
from fsm_learner.machine import Hook, State

if TYPE_CHECKING:
    from fsm_learner.learner import Learner

__all__ = ["HookRecord", "HostReads", "RecordingCallback"]


class HookRecord(NamedTuple):
    """One hook call as the recording callback saw it."""

    hook: Hook
    state: State
    epoch: int
    iter: int
    training: bool


class RecordingCallback(Callback):
    """Appends a HookRecord for every hook call, to ``records``."""

    def __init__(self, order: int = 0) -> None:
        """Record into a fresh list; ``order`` places this callback among the others."""
        self.order = order
        self.records: list[HookRecord] = []

    @property
    def hooks(self) -> list[Hook]:
        """The hook names alone, in call order."""
        return [r.hook for r in self.records]

    def _record(self, hook: Hook, learn: Learner) -> None:
        self.records.append(HookRecord(hook, learn.state, learn.epoch, learn.iter, learn.training))

    def before_fit(self, learn: Learner) -> None:
        """Record before_fit."""
        self._record(Hook.BEFORE_FIT, learn)

    def before_epoch(self, learn: Learner) -> None:
        """Record before_epoch."""
        self._record(Hook.BEFORE_EPOCH, learn)

    def before_batch(self, learn: Learner) -> None:
        """Record before_batch."""
        self._record(Hook.BEFORE_BATCH, learn)

    def after_predict(self, learn: Learner) -> None:
        """Record after_predict."""
        self._record(Hook.AFTER_PREDICT, learn)

    def after_loss(self, learn: Learner) -> None:
        """Record after_loss."""
        self._record(Hook.AFTER_LOSS, learn)

    def after_backward(self, learn: Learner) -> None:
        """Record after_backward."""
        self._record(Hook.AFTER_BACKWARD, learn)

    def after_step(self, learn: Learner) -> None:
        """Record after_step."""
        self._record(Hook.AFTER_STEP, learn)

    def after_batch(self, learn: Learner) -> None:
        """Record after_batch."""
        self._record(Hook.AFTER_BATCH, learn)

    def after_epoch(self, learn: Learner) -> None:
        """Record after_epoch."""
        self._record(Hook.AFTER_EPOCH, learn)

    def after_fit(self, learn: Learner) -> None:
        """Record after_fit."""
        self._record(Hook.AFTER_FIT, learn)

    def after_cancel_batch(self, learn: Learner) -> None:
        """Record after_cancel_batch."""
        self._record(Hook.AFTER_CANCEL_BATCH, learn)

    def after_cancel_epoch(self, learn: Learner) -> None:
        """Record after_cancel_epoch."""
        self._record(Hook.AFTER_CANCEL_EPOCH, learn)

    def after_cancel_fit(self, learn: Learner) -> None:
        """Record after_cancel_fit."""
        self._record(Hook.AFTER_CANCEL_FIT, learn)

    def after_fail(self, learn: Learner) -> None:
        """Record after_fail."""
        self._record(Hook.AFTER_FAIL, learn)


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values (``item``, ``tolist``, ``float(t)``, ...) in a block."""

    READS: ClassVar[frozenset[str]] = frozenset(
        {"item", "tolist", "__float__", "__int__", "__bool__", "numpy"},
    )

    def __init__(self) -> None:
        """Start counting from zero."""
        super().__init__()
        self.count = 0

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Count the call if it reads a value back, then run it."""
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))
