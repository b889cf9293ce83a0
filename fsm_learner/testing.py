"""Helpers for testing code that uses fsm_learner: record what the loop did, assert it whole.

``RecordingCallback`` implements every hook, the cleanup hooks included, and appends one
``HookRecord`` per call, so a test can compare the whole trace at once with the trace
``expected_trace`` walks through the transition table for a run without cancels or
failures::

    rec = RecordingCallback()
    Learner(model, dls, loss, lr, cbs=[rec]).fit(2)  # 3 training, 1 validation batches
    assert expected_trace("fit", n_epochs=2, batches=(3, 1)) == rec.records

``HostReads`` counts the calls that read a tensor's value back to the host, each a
device sync on a GPU, so a test can show a callback costs none per batch::

    with HostReads() as reads:
        learn.fit(1)
    assert reads.count == 0

Library code never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple

from torch.overrides import TorchFunctionMode

from fsm_learner.callback import Callback
from fsm_learner.exceptions import ConfigurationError
from fsm_learner.machine import (
    TRANSITION_TABLE,
    Hook,
    HookTiming,
    RunKind,
    State,
    Trigger,
    cleanup_hooks,
    table_routes,
)

if TYPE_CHECKING:
    from fsm_learner.learner import Learner

__all__ = ["HookRecord", "HostReads", "RecordingCallback", "expected_hooks", "expected_trace"]


class HookRecord(NamedTuple):
    """One hook call as the recording callback saw it."""

    hook: Hook
    state: State
    epoch: int
    iter: int
    training: bool


class RecordingCallback(Callback):
    """Appends a HookRecord for every hook call, the cleanup hooks included, to ``records``."""

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

    def after_preempt(self, learn: Learner) -> None:
        """Record after_preempt."""
        self._record(Hook.AFTER_PREEMPT, learn)

    def after_fail(self, learn: Learner) -> None:
        """Record after_fail."""
        self._record(Hook.AFTER_FAIL, learn)

    def cleanup_batch(self, learn: Learner) -> None:
        """Record cleanup_batch."""
        self._record(Hook.CLEANUP_BATCH, learn)

    def cleanup_epoch(self, learn: Learner) -> None:
        """Record cleanup_epoch."""
        self._record(Hook.CLEANUP_EPOCH, learn)

    def cleanup_fit(self, learn: Learner) -> None:
        """Record cleanup_fit."""
        self._record(Hook.CLEANUP_FIT, learn)


_BATCH_WORK: Final = frozenset(
    {Trigger.PREDICT, Trigger.COMPUTE_LOSS, Trigger.BACKWARD, Trigger.STEP, Trigger.END_BATCH},
)
"""The triggers of a batch's work: the table's guards say which of them a mode takes."""


class _Walk:
    """Fires the triggers of a run without cancels or failures, recording hooks as the learner does.

    Where each transition goes, which hook it runs, before or after the state change,
    and which cleanup hooks follow are read off the table's compiled routes and rows; the
    walk itself knows only the loop's nesting: a fit holds epochs, an epoch a training
    and a validation pass, a pass its batches.
    """

    def __init__(self, kind: RunKind) -> None:
        self.kind = kind
        self.routes = table_routes()
        self.state = State.IDLE
        self.epoch = self.iter = 0
        self.training = False
        self.trace: list[HookRecord] = []

    def fire(self, trigger: Trigger) -> None:
        source = self.state
        dest = self.routes[self.kind, self.training][source][trigger]
        [spec] = [
            s
            for s in TRANSITION_TABLE
            if s.trigger is trigger and source in s.sources and s.dest is dest
        ]
        before = spec.timing is HookTiming.BEFORE_CHANGE
        self.record(spec.hook, source if before else dest)
        self.state = dest
        for hook in cleanup_hooks(source, dest, self.kind):
            self.record(hook, dest)

    def record(self, hook: Hook, state: State) -> None:
        self.trace.append(HookRecord(hook, state, self.epoch, self.iter, self.training))

    def one_pass(self, n_batches: int, *, training: bool) -> None:
        self.training, self.iter = training, 0
        self.fire(Trigger.BEGIN_EPOCH)
        for i in range(n_batches):
            self.iter = i
            self.fire(Trigger.BEGIN_BATCH)
            while self.state is not State.EPOCH:
                [work] = [
                    t for t in self.routes[self.kind, training][self.state] if t in _BATCH_WORK
                ]
                self.fire(work)
        self.fire(Trigger.END_EPOCH)

    def fit(self, n_epochs: int, n_train: int, n_valid: int) -> None:
        self.fire(Trigger.BEGIN_FIT)
        for epoch in range(n_epochs):
            self.epoch = epoch
            self.one_pass(n_train, training=True)
            self.one_pass(n_valid, training=False)
        self.fire(Trigger.END_FIT)


def expected_trace(
    kind: RunKind | str = RunKind.FIT,
    *,
    n_epochs: int = 1,
    batches: Sequence[int] = (1, 1),
) -> list[HookRecord]:
    """Return the records a RecordingCallback makes in a run without cancels or failures.

    ``kind`` is ``"fit"``, ``"validate"`` or ``"predict"``. ``batches`` holds the batches
    of each pass of an epoch: a fit's training and validation pass (``(3, 1)``), or the
    one pass of a validate or predict run (``(3,)``, with ``n_epochs`` left at 1). The
    states, hooks and cleanup hooks come from ``TRANSITION_TABLE``.
    """
    run = RunKind(kind)
    passes = 2 if run is RunKind.FIT else 1
    counts = tuple(batches) if isinstance(batches, Sequence) else (batches,)
    if len(counts) != passes or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts
    ):
        msg = (
            f"batches must hold {passes} int(s) >= 0 for a {run} run (the batches of "
            f"{'its training and validation pass' if passes == 2 else 'its one pass'}), "
            f"got {counts!r}"
        )
        raise ConfigurationError(msg)
    walk = _Walk(run)
    if run is RunKind.FIT:
        walk.fit(n_epochs, *counts)
    elif n_epochs != 1:
        msg = f"a {run} run is one pass: n_epochs must be 1, got {n_epochs!r}"
        raise ConfigurationError(msg)
    else:
        walk.one_pass(counts[0], training=False)
    return walk.trace


def expected_hooks(
    kind: RunKind | str = RunKind.FIT,
    *,
    n_epochs: int = 1,
    batches: Sequence[int] = (1, 1),
) -> list[Hook]:
    """Return the hooks alone of ``expected_trace``: what ``RecordingCallback.hooks`` holds."""
    return [r.hook for r in expected_trace(kind, n_epochs=n_epochs, batches=batches)]


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
