"""fsm_learner: a PyTorch training loop that runs as an explicit finite-state machine."""

from fsm_learner.audit.schema import RunStatus
from fsm_learner.callback import Callback, Override
from fsm_learner.diagram import DiagramFormat
from fsm_learner.exceptions import (
    AuditLogInUseError,
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
    ConfigurationError,
    FsmLearnerError,
    IllegalCancelError,
    InvalidCallbackError,
    InvalidDataLoadersError,
    InvalidTransitionError,
)
from fsm_learner.learner import DataLoaders, Failure, FitResult, Learner
from fsm_learner.machine import (
    TRANSITION_TABLE,
    Guard,
    Hook,
    HookTiming,
    State,
    TransitionSpec,
    Trigger,
    build_machine,
)

__version__ = "0.1.0"

__all__ = [
    "TRANSITION_TABLE",
    "AuditLogInUseError",
    "Callback",
    "CancelBatchException",
    "CancelEpochException",
    "CancelException",
    "CancelFitException",
    "ConfigurationError",
    "DataLoaders",
    "DiagramFormat",
    "Failure",
    "FitResult",
    "FsmLearnerError",
    "Guard",
    "Hook",
    "HookTiming",
    "IllegalCancelError",
    "InvalidCallbackError",
    "InvalidDataLoadersError",
    "InvalidTransitionError",
    "Learner",
    "Override",
    "RunStatus",
    "State",
    "TransitionSpec",
    "Trigger",
    "__version__",
    "build_machine",
]
