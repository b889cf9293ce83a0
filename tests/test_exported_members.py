"""The public API: __all__ is complete and every name in it exists."""

from __future__ import annotations

import inspect

import fsm_learner
import fsm_learner.testing


def test_all_is_complete():
    """Every public name of the package is in __all__, and only those."""
    public = {
        name
        for name in dir(fsm_learner)  # dir(): the names imported lazily too
        if not name.startswith("_") and not inspect.ismodule(getattr(fsm_learner, name))
    }
    assert set(fsm_learner.__all__) - {"__version__"} == public


def test_issue_exports():
    """The names the core issue asks for are importable from fsm_learner."""
    for name in [
        "Learner",
        "Callback",
        "DataLoaders",
        "CancelFitException",
        "CancelEpochException",
        "CancelBatchException",
        "State",
        "Trigger",
        "TRANSITION_TABLE",
        "FsmLearnerError",
        "InvalidTransitionError",
        "IllegalCancelError",
    ]:
        assert getattr(fsm_learner, name) is not None


def test_testing_module_exports():
    """fsm_learner.testing exports the recording callback and the expected traces."""
    assert set(fsm_learner.testing.__all__) == {
        "HookRecord",
        "HostReads",
        "RecordingCallback",
        "expected_hooks",
        "expected_trace",
    }
