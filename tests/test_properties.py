"""Hypothesis: random callback sets raise random cancels and errors at random hooks.

The oracle below is the seed's loop (nested try/except, no machine) extended with the
issue's rules: after_cancel_x instead of after_x, after_fail on any other exception, and
a cancel outside its unit is an error. It never reads the transition table, so the
learner (driven by the table) and the oracle agree only if the table says what the issue
says.
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
    CancelFitException,
    Hook,
    IllegalCancelError,
    Learner,
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
Plan = dict[tuple[Hook, int], Callable[[], BaseException]]


class Oracle:
    """What the issue says happens, written as the seed's loop."""

    def __init__(self, n_epochs: int, n_train: int, n_valid: int, plan: Plan) -> None:
        self.n_epochs, self.sizes, self.plan = n_epochs, (n_train, n_valid), plan
        self.trace: list[HookRecord] = []
        self.fired: list[bool] = []
        self.seen: Counter[Hook] = Counter()
        self.epoch = self.iter = 0
        self.training = False
        self.outcome: type[BaseException] | None = None
        self.completed: Counter[bool] = Counter()

    def call(self, hook: Hook, state: State) -> None:
        self.seen[hook] += 1
        self.trace.append(HookRecord(hook, state, self.epoch, self.iter, self.training))
        make = self.plan.get((hook, self.seen[hook]))
        self.fired.append(make is not None)
        if make is None or hook is H.AFTER_FAIL:
            return
        exc = make()
        if isinstance(exc, tuple(UNIT_STATES)) and state not in UNIT_STATES[type(exc)]:
            raise IllegalCancelError from exc
        raise exc

    def fit(self) -> None:
        try:
            try:
                self.call(H.BEFORE_FIT, S.FIT)
                for epoch in range(self.n_epochs):
                    self.epoch = epoch
                    self.one_pass(training=True)
                    self.one_pass(training=False)
                self.call(H.AFTER_FIT, S.FIT)
            except CancelFitException:
                self.call(H.AFTER_CANCEL_FIT, S.IDLE)
        except BaseException as exc:
            self.outcome = type(exc)
            self.call(H.AFTER_FAIL, S.IDLE)

    def one_pass(self, *, training: bool) -> None:
        self.training = training
        self.iter = 0
        try:
            self.call(H.BEFORE_EPOCH, S.EPOCH)
            for i in range(self.sizes[0 if training else 1]):
                self.iter = i
                self.one_batch()
            self.call(H.AFTER_EPOCH, S.EPOCH)
        except CancelEpochException:
            self.call(H.AFTER_CANCEL_EPOCH, S.FIT)

    def one_batch(self) -> None:
        try:
            self.call(H.BEFORE_BATCH, S.BATCH)
            self.call(H.AFTER_PREDICT, S.PREDICT)
            self.call(H.AFTER_LOSS, S.LOSS)
            if self.training:
                self.call(H.AFTER_BACKWARD, S.BACKWARD)
                self.call(H.AFTER_STEP, S.STEP)
            self.call(H.AFTER_BATCH, S.STEP if self.training else S.LOSS)
            self.completed[self.training] += 1
        except CancelBatchException:
            self.call(H.AFTER_CANCEL_BATCH, S.EPOCH)


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


@settings(max_examples=250, deadline=None)
@given(
    n_epochs=st.integers(0, 3),
    n_train=st.integers(0, 3),
    n_valid=st.integers(0, 2),
    plans=st.lists(st.tuples(st.integers(-5, 5), PLANS), min_size=1, max_size=3),
)
def test_learner_follows_the_path_table(n_epochs, n_train, n_valid, plans):
    """Whatever is raised where, the learner's trace equals the oracle's and it ends idle."""
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

    oracle = Oracle(n_epochs, n_train, n_valid, merged)
    oracle.fit()
    if oracle.outcome is None:
        learn.fit(n_epochs)
    else:
        with pytest.raises(oracle.outcome):
            learn.fit(n_epochs)

    assert oracle.trace == first.records
    late = [
        r
        for r, fired in zip(oracle.trace, oracle.fired, strict=True)
        if not fired or r.hook is H.AFTER_FAIL
    ]
    assert late == last.records
    assert learn.state == "idle"
    assert oracle.completed == {
        t: learn.counts[Trigger.END_BATCH, t]
        for t in (True, False)
        if learn.counts[Trigger.END_BATCH, t]
    }
    assert (learn.failure is None) == (oracle.outcome is None)
