"""fsm_learner.testing: the recorder sees every hook, and the expected traces are the learner's."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from helpers import batches_dls, mlp

from fsm_learner import Callback, ConfigurationError, Hook, Learner, RunKind, State
from fsm_learner.testing import HookRecord, RecordingCallback, expected_hooks, expected_trace

H, S = Hook, State


def fit_trace() -> list[HookRecord]:
    """fit(1) over one training and one validation batch, written out by hand from the docs.

    The only copy of the normal path in the tests: everywhere else it comes from
    ``expected_trace``, which this pins to what the docs say.
    """

    def r(hook: Hook, state: State, training: bool) -> HookRecord:
        return HookRecord(hook, state, 0, 0, training)

    return [
        r(H.BEFORE_FIT, S.FIT, False),
        r(H.BEFORE_EPOCH, S.EPOCH, True),
        r(H.BEFORE_BATCH, S.BATCH, True),
        r(H.AFTER_PREDICT, S.PREDICT, True),
        r(H.AFTER_LOSS, S.LOSS, True),
        r(H.AFTER_BACKWARD, S.BACKWARD, True),
        r(H.AFTER_STEP, S.STEP, True),
        r(H.AFTER_BATCH, S.STEP, True),  # an end_* hook runs before its state change
        r(H.CLEANUP_BATCH, S.EPOCH, True),  # a cleanup hook, after it
        r(H.AFTER_EPOCH, S.EPOCH, True),
        r(H.CLEANUP_EPOCH, S.FIT, True),
        r(H.BEFORE_EPOCH, S.EPOCH, False),
        r(H.BEFORE_BATCH, S.BATCH, False),
        r(H.AFTER_PREDICT, S.PREDICT, False),
        r(H.AFTER_LOSS, S.LOSS, False),
        r(H.AFTER_BATCH, S.LOSS, False),
        r(H.CLEANUP_BATCH, S.EPOCH, False),
        r(H.AFTER_EPOCH, S.EPOCH, False),
        r(H.CLEANUP_EPOCH, S.FIT, False),
        r(H.AFTER_FIT, S.FIT, False),
        r(H.CLEANUP_FIT, S.IDLE, False),
    ]


class TestExpectedTrace:
    def test_a_fit_by_hand(self):
        """The walk through the table gives the trace the docs describe, written out once here."""
        assert expected_trace("fit", n_epochs=1, batches=(1, 1)) == fit_trace()

    def test_a_validate_run_by_hand(self):
        """A validate run: idle straight into a pass, a batch without backward or step."""
        assert expected_trace("validate", batches=(1,)) == [
            HookRecord(H.BEFORE_EPOCH, S.EPOCH, 0, 0, False),
            HookRecord(H.BEFORE_BATCH, S.BATCH, 0, 0, False),
            HookRecord(H.AFTER_PREDICT, S.PREDICT, 0, 0, False),
            HookRecord(H.AFTER_LOSS, S.LOSS, 0, 0, False),
            HookRecord(H.AFTER_BATCH, S.LOSS, 0, 0, False),
            HookRecord(H.CLEANUP_BATCH, S.EPOCH, 0, 0, False),
            HookRecord(H.AFTER_EPOCH, S.EPOCH, 0, 0, False),
            HookRecord(H.CLEANUP_EPOCH, S.IDLE, 0, 0, False),
        ]

    def test_a_predict_run_by_hand(self):
        """A predict run: each batch ends after the forward pass, no loss."""
        assert expected_trace(RunKind.PREDICT, batches=(2,)) == [
            HookRecord(H.BEFORE_EPOCH, S.EPOCH, 0, 0, False),
            HookRecord(H.BEFORE_BATCH, S.BATCH, 0, 0, False),
            HookRecord(H.AFTER_PREDICT, S.PREDICT, 0, 0, False),
            HookRecord(H.AFTER_BATCH, S.PREDICT, 0, 0, False),
            HookRecord(H.CLEANUP_BATCH, S.EPOCH, 0, 0, False),
            HookRecord(H.BEFORE_BATCH, S.BATCH, 0, 1, False),
            HookRecord(H.AFTER_PREDICT, S.PREDICT, 0, 1, False),
            HookRecord(H.AFTER_BATCH, S.PREDICT, 0, 1, False),
            HookRecord(H.CLEANUP_BATCH, S.EPOCH, 0, 1, False),
            HookRecord(H.AFTER_EPOCH, S.EPOCH, 0, 1, False),
            HookRecord(H.CLEANUP_EPOCH, S.IDLE, 0, 1, False),
        ]

    @pytest.mark.parametrize(
        ("n_epochs", "n_train", "n_valid"),
        [(0, 2, 1), (1, 0, 0), (1, 3, 0), (2, 2, 1), (3, 1, 2)],
    )
    def test_equals_what_a_fit_records(self, n_epochs, n_train, n_valid):
        """The learner's whole trace, counters included, for fits of every shape."""
        rec = RecordingCallback()
        learn = Learner(mlp(), batches_dls(n_train, n_valid), F.cross_entropy, 0.1, [rec])
        learn.fit(n_epochs)
        assert expected_trace(n_epochs=n_epochs, batches=(n_train, n_valid)) == rec.records

    @pytest.mark.parametrize("kind", [RunKind.VALIDATE, RunKind.PREDICT])
    @pytest.mark.parametrize("n_batches", [0, 1, 3])
    def test_equals_what_an_inference_run_records(self, kind, n_batches):
        """validate() and get_preds() record what the walk gives for their kind."""
        rec = RecordingCallback()
        learn = Learner(mlp(), batches_dls(1, n_batches), F.cross_entropy, 0.1, [rec])
        learn.validate() if kind is RunKind.VALIDATE else learn.get_preds()
        assert expected_trace(kind, batches=(n_batches,)) == rec.records

    def test_hooks_are_the_records_hooks(self):
        """expected_hooks is expected_trace's hooks, as RecordingCallback.hooks is."""
        trace = expected_trace(n_epochs=2, batches=(2, 1))
        assert expected_hooks(n_epochs=2, batches=(2, 1)) == [r.hook for r in trace]
        # per epoch: each pass's 3 hooks, 7 per training batch and 5 per validation batch
        assert len(trace) == 1 + 2 * ((3 + 2 * 7) + (3 + 5)) + 2

    def test_one_pass_may_be_counted_by_an_int(self):
        """A validate or predict run's one pass count may be given as an int."""
        assert expected_trace("validate", batches=3) == expected_trace("validate", batches=(3,))

    @pytest.mark.parametrize(
        ("kind", "kwargs", "message"),
        [
            ("fit", {"batches": (1,)}, r"batches must hold 2 int\(s\) >= 0 for a fit run"),
            ("validate", {"batches": (1, 1)}, r"1 int\(s\) >= 0 for a validate run .* its one"),
            ("fit", {"batches": (1, -1)}, r"got \(1, -1\)"),
            ("predict", {"batches": (1,), "n_epochs": 2}, "one pass: n_epochs must be 1, got 2"),
            ("fit", {"batches": 3}, r"2 int\(s\) >= 0 for a fit run .* got \(3,\)"),
            ("fit", {"batches": (1, "2")}, r"got \(1, '2'\)"),
        ],
    )
    def test_refuses_what_no_run_does(self, kind, kwargs, message):
        """A pass count that does not fit the kind is refused, naming what would."""
        with pytest.raises(ConfigurationError, match=message):
            expected_trace(kind, **kwargs)


class TestRecordingCallback:
    def test_implements_every_hook(self):
        """Every hook, the cleanup hooks included, is recorded: none is left to the base class."""
        missing = {h for h in Hook if getattr(RecordingCallback, h) is getattr(Callback, h)}
        assert missing == set()

    def test_records_each_hook_under_its_own_name(self):
        """Calling each hook method records that hook, with the learner's counters."""
        rec = RecordingCallback()
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1)
        for hook in Hook:
            getattr(rec, hook)(learn)
        assert rec.records == [HookRecord(h, S.IDLE, 0, 0, False) for h in Hook]
