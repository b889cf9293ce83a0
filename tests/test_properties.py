"""Hypothesis: random callback sets raise random cancels and errors at random hooks.

The oracle below is the loop written the plain way, as nested try/except without a
machine, with the documented rules: after_cancel_x instead of after_x, after_fail on any
other exception, a cancel outside its unit (or in a cleanup hook) is an error, and each
unit's cleanup hook runs once the unit is left, whatever the route. It never reads the
transition table, so the learner (driven by the table) and the oracle agree only if the
table says what the docs say.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch.nn.functional as F
from helpers import Boom, Raiser, batches_dls, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from fsm_learner import (
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
    Hook,
    IllegalCancelError,
    Learner,
    RunKind,
    State,
    Trigger,
)
from fsm_learner.testing import HookRecord, RecordingCallback

H, S = Hook, State
IN_BATCH = {S.BATCH, S.PREDICT, S.LOSS, S.BACKWARD, S.STEP}
UNIT_STATES = {
    CancelBatchException: IN_BATCH,
    CancelEpochException: IN_BATCH | {S.EPOCH},
    CancelFitException: IN_BATCH | {S.EPOCH, S.FIT},
}
CLEANUPS = {H.CLEANUP_BATCH, H.CLEANUP_EPOCH, H.CLEANUP_FIT}
Plan = dict[tuple[Hook, int], Callable[[], BaseException]]


class Oracle:
    """What the docs say happens, written as a plain loop that keeps its open units on a stack."""

    def __init__(
        self, kind: RunKind, n_epochs: int, n_train: int, n_valid: int, plan: Plan
    ) -> None:
        self.kind, self.plan = kind, plan
        self.n_epochs, self.sizes = n_epochs, (n_train, n_valid)
        self.trace: list[HookRecord] = []
        self.fired: list[bool] = []
        self.seen: Counter[Hook] = Counter()
        self.epoch = self.iter = 0
        self.training = False
        self.outcome: type[BaseException] | None = None
        self.completed: Counter[bool] = Counter()
        self.open: list[Hook] = []
        """The cleanup hooks of the units open, outermost first."""

    def call(self, hook: Hook, state: State, *, guarded: bool = False) -> None:
        """Record the hook; raise what the plan says, unless the call is guarded."""
        self.seen[hook] += 1
        self.trace.append(HookRecord(hook, state, self.epoch, self.iter, self.training))
        make = self.plan.get((hook, self.seen[hook]))
        self.fired.append(make is not None)
        if make is None or guarded:
            return
        exc = make()
        cancel = isinstance(exc, tuple(UNIT_STATES))
        if cancel and (hook in CLEANUPS or state not in UNIT_STATES[type(exc)]):
            raise IllegalCancelError from exc
        raise exc

    def enter(self, cleanup: Hook) -> None:
        self.open.append(cleanup)

    def leave(self, depth: int) -> list[Hook]:
        """Close all but the ``depth`` outermost units; return their cleanups, innermost first."""
        left = self.open[depth:][::-1]
        del self.open[depth:]
        return left

    def clean(self, cleanups: list[Hook], state: State, pending: BaseException | None) -> None:
        """Run every cleanup; raise the first error after all (an error on its way stays first)."""
        first = None if pending is None or isinstance(pending, CancelException) else pending
        for hook in cleanups:
            try:
                self.call(hook, state)
            except BaseException as exc:
                if first is None:
                    first = exc
        if first is not None and first is not pending:
            raise first

    def end(self, hook: Hook, state: State, dest: State, depth: int) -> None:
        """An end_x: its hook before the state change, the unit's cleanup after it."""
        self.call(hook, state)
        if hook is H.AFTER_BATCH:
            self.completed[self.training] += 1
        self.clean(self.leave(depth), dest, None)

    def cancel(self, hook: Hook, dest: State, depth: int) -> None:
        """A cancel_x: the units are left first; their cleanups run whatever the hook raises."""
        left = self.leave(depth)
        try:
            self.call(hook, dest)
        except BaseException as exc:
            self.clean(left, dest, exc)
            raise
        self.clean(left, dest, None)

    def run(self) -> None:
        """A fit, or a validate or predict run: one validation pass, no fit around it."""
        try:
            try:
                if self.kind is RunKind.FIT:
                    self.fit()
                else:
                    self.one_pass(training=False)
            except CancelFitException:
                self.cancel(H.AFTER_CANCEL_FIT, S.IDLE, 0)
        except BaseException as exc:
            self.outcome = type(exc)
            self.call(H.AFTER_FAIL, S.IDLE, guarded=True)
            for hook in self.leave(0):
                self.call(hook, S.IDLE, guarded=True)

    def fit(self) -> None:
        self.enter(H.CLEANUP_FIT)
        self.call(H.BEFORE_FIT, S.FIT)
        for epoch in range(self.n_epochs):
            self.epoch = epoch
            self.one_pass(training=True)
            self.one_pass(training=False)
        self.end(H.AFTER_FIT, S.FIT, S.IDLE, 0)

    def one_pass(self, *, training: bool) -> None:
        self.training = training
        self.iter = 0
        outside = S.FIT if self.kind is RunKind.FIT else S.IDLE  # a validate run has no fit
        depth = len(self.open)  # the units around the pass
        try:
            self.enter(H.CLEANUP_EPOCH)
            self.call(H.BEFORE_EPOCH, S.EPOCH)
            for i in range(self.sizes[0 if training else 1]):
                self.iter = i
                self.one_batch()
            self.end(H.AFTER_EPOCH, S.EPOCH, outside, depth)
        except CancelEpochException:
            self.cancel(H.AFTER_CANCEL_EPOCH, outside, depth)

    def one_batch(self) -> None:
        depth = len(self.open)
        try:
            self.enter(H.CLEANUP_BATCH)
            self.call(H.BEFORE_BATCH, S.BATCH)
            self.call(H.AFTER_PREDICT, S.PREDICT)
            state = S.PREDICT
            if self.kind is not RunKind.PREDICT:  # a predict run computes no loss
                self.call(H.AFTER_LOSS, S.LOSS)
                state = S.LOSS
            if self.training:
                self.call(H.AFTER_BACKWARD, S.BACKWARD)
                self.call(H.AFTER_STEP, S.STEP)
                state = S.STEP
            self.end(H.AFTER_BATCH, state, S.EPOCH, depth)
        except CancelBatchException:
            self.cancel(H.AFTER_CANCEL_BATCH, S.EPOCH, depth)


FAULTS = st.sampled_from(
    [CancelBatchException, CancelEpochException, CancelFitException, Boom, KeyboardInterrupt],
)
PLANS = st.dictionaries(
    st.tuples(st.sampled_from(list(Hook)), st.integers(1, 4)),
    FAULTS,
    max_size=6,
)


class Counting(RecordingCallback):
    """Records, and counts every call of each hook for the raisers that come after it."""

    def __init__(self, order: int) -> None:
        super().__init__(order)
        self.calls: Counter[Hook] = Counter()

    def _record(self, hook: Hook, learn: Learner) -> None:
        super()._record(hook, learn)
        self.calls[hook] += 1


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(list(RunKind)),
    n_epochs=st.integers(0, 3),
    n_train=st.integers(0, 3),
    n_valid=st.integers(0, 2),
    plans=st.lists(st.tuples(st.integers(-5, 5), PLANS), min_size=1, max_size=3),
)
@pytest.mark.filterwarnings("ignore::fsm_learner.PartialResultWarning")  # cancelled on purpose
def test_learner_follows_the_path_table(kind, n_epochs, n_train, n_valid, plans):
    """Whatever is raised where, in any kind of run, the traces agree; the learner ends idle."""
    first = Counting(order=-10)
    # of the raisers naming the same hook call, the first in hook order raises
    raisers = []
    claimed: set[tuple[Hook, int]] = set()
    for order, plan in sorted(plans, key=lambda p: p[0]):
        own = {k: v for k, v in plan.items() if k not in claimed}
        claimed |= own.keys()
        raisers.append(Raiser(own, order=order, calls=first.calls))
    merged: Plan = {k: v for r in raisers for k, v in r.plan.items()}
    last = Counting(order=10)
    learn = Learner(
        mlp(),
        batches_dls(n_train, n_valid),
        F.cross_entropy,
        0.1,
        [last, *reversed(raisers), first],
    )

    oracle = Oracle(kind, n_epochs, n_train, n_valid, merged)
    oracle.run()
    start = {
        RunKind.FIT: lambda: learn.fit(n_epochs),
        RunKind.VALIDATE: learn.validate,
        RunKind.PREDICT: learn.get_preds,
    }[kind]
    if oracle.outcome is None:
        start()
    else:
        with pytest.raises(oracle.outcome):
            start()

    assert oracle.trace == first.records
    # a raiser stops the callbacks after it, but for after_fail and cleanup hooks: all run
    late = [
        r
        for r, fired in zip(oracle.trace, oracle.fired, strict=True)
        if not fired or r.hook is H.AFTER_FAIL or r.hook in CLEANUPS
    ]
    assert late == last.records
    # each unit opened is cleaned up exactly once, whatever was raised where
    cleaned = Counter(last.hooks)
    for begin, cleanup in [
        (Trigger.BEGIN_FIT, H.CLEANUP_FIT),
        (Trigger.BEGIN_EPOCH, H.CLEANUP_EPOCH),
        (Trigger.BEGIN_BATCH, H.CLEANUP_BATCH),
    ]:
        assert cleaned[cleanup] == learn.counts[begin, True] + learn.counts[begin, False]
    assert learn.state == "idle"
    assert oracle.completed == {
        t: learn.counts[Trigger.END_BATCH, t]
        for t in (True, False)
        if learn.counts[Trigger.END_BATCH, t]
    }
    assert (learn.failure is None) == (oracle.outcome is None)
