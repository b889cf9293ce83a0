"""fsm_learner: a PyTorch training loop that runs as an explicit finite-state machine."""

import importlib
import typing

from fsm_learner.audit.codec import RunStatus
from fsm_learner.callback import Callback, MetricsProvider, Override
from fsm_learner.exceptions import (
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
    CheckpointError,
    ConfigurationError,
    DistributedError,
    DistributedWarning,
    DivergenceError,
    FsmLearnerError,
    FsmLearnerWarning,
    IllegalCancelError,
    InvalidBatchError,
    InvalidCallbackError,
    InvalidDataLoadersError,
    InvalidTransitionError,
    PartialResultWarning,
    RankFailedError,
    RankLostError,
    ResumeWarning,
    TerminatedError,
)
from fsm_learner.machine import (
    TRANSITION_TABLE,
    Guard,
    Hook,
    HookTiming,
    RunKind,
    State,
    TransitionSpec,
    Trigger,
    build_machine,
)

if typing.TYPE_CHECKING:
    from fsm_learner.diagram import DiagramFormat
    from fsm_learner.distributed import Distributed, World
    from fsm_learner.learner import DataLoaders, Failure, FitResult, Learner
    from fsm_learner.optim import weight_decay_groups

__version__ = "0.1.0"

__all__ = [
    "TRANSITION_TABLE",
    "Callback",
    "CancelBatchException",
    "CancelEpochException",
    "CancelException",
    "CancelFitException",
    "CheckpointError",
    "ConfigurationError",
    "DataLoaders",
    "DiagramFormat",
    "Distributed",
    "DistributedError",
    "DistributedWarning",
    "DivergenceError",
    "Failure",
    "FitResult",
    "FsmLearnerError",
    "FsmLearnerWarning",
    "Guard",
    "Hook",
    "HookTiming",
    "IllegalCancelError",
    "InvalidBatchError",
    "InvalidCallbackError",
    "InvalidDataLoadersError",
    "InvalidTransitionError",
    "Learner",
    "MetricsProvider",
    "Override",
    "PartialResultWarning",
    "RankFailedError",
    "RankLostError",
    "ResumeWarning",
    "RunKind",
    "RunStatus",
    "State",
    "TerminatedError",
    "TransitionSpec",
    "Trigger",
    "World",
    "__version__",
    "build_machine",
    "weight_decay_groups",
]

# The learner's names need torch, and importing torch takes about a second: they are
# imported on first use (PEP 562), so that `fsm-learner audit` and `fsm-learner diagram
# --from-log`, which read logs only, start without it. The diagrams are drawn on demand.
_LAZY: typing.Final = {
    "DataLoaders": "fsm_learner.learner",
    "Failure": "fsm_learner.learner",
    "FitResult": "fsm_learner.learner",
    "Learner": "fsm_learner.learner",
    "DiagramFormat": "fsm_learner.diagram",
    "Distributed": "fsm_learner.distributed",
    "World": "fsm_learner.distributed",
    "weight_decay_groups": "fsm_learner.optim",
}


def __getattr__(name: str) -> object:
    """Import a lazily exported name from its module, once."""
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'fsm_learner' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # from now on a plain module attribute
    return value


def __dir__() -> list[str]:
    """List the module's names, the lazily imported ones included."""
    return sorted({*globals(), *_LAZY})
