"""Every exception fsm_learner raises or understands, in one place.

Cancels are control flow that a callback raises to abandon a unit of work; each one
is the guard of a cancel transition in the machine. Errors are failures of ours::

    Exception
    ├── CancelException                  (control flow, never an error)
    │   ├── CancelFitException           -> cancel_fit
    │   ├── CancelEpochException         -> cancel_epoch
    │   └── CancelBatchException         -> cancel_batch
    └── FsmLearnerError                  (base of every error of ours)
        ├── ConfigurationError           (also ValueError)
        ├── InvalidCallbackError         (also TypeError)
        ├── InvalidDataLoadersError      (also TypeError)
        ├── InvalidBatchError            (also TypeError) a batch or output the loop cannot read
        ├── CheckpointError              (also ValueError) a checkpoint that cannot be used
        ├── DistributedError             (also RuntimeError) the ranks cannot go on together
        │   ├── RankFailedError          another rank failed; its exception is named
        │   ├── RankLostError            a rank stopped answering (died or hung): named
        │   └── DivergenceError          the ranks' paths differ: the first difference named
        ├── TerminatedError              (also RuntimeError) SIGTERM ended a fit across ranks
        └── InvalidTransitionError       (also RuntimeError)
            └── IllegalCancelError       a cancel raised where its transition is not allowed

Warnings::

    UserWarning
    └── FsmLearnerWarning
        ├── PartialResultWarning         (also RuntimeWarning) validate/get_preds cancelled
        ├── DistributedWarning           (also RuntimeWarning) a loader left as it was across ranks
        └── ResumeWarning                (also RuntimeWarning) a resume fell back or may drift

Any other exception raised during a fit is not wrapped: it takes the machine's failure
transition and is re-raised as the same object, with a note naming where it happened.
"""

from __future__ import annotations

__all__ = [
    "CancelBatchException",
    "CancelEpochException",
    "CancelException",
    "CancelFitException",
    "CheckpointError",
    "ConfigurationError",
    "DistributedError",
    "DistributedWarning",
    "DivergenceError",
    "FsmLearnerError",
    "FsmLearnerWarning",
    "IllegalCancelError",
    "InvalidBatchError",
    "InvalidCallbackError",
    "InvalidDataLoadersError",
    "InvalidTransitionError",
    "NoRunError",
    "PartialResultWarning",
    "RankFailedError",
    "RankLostError",
    "ResumeWarning",
    "TerminatedError",
]


class CancelException(Exception):  # noqa: N818 (the seed's names, kept for its users)
    """Base of the cancels: raised by a callback to abandon the rest of a unit of work."""


class CancelFitException(CancelException):
    """Abandon the fit: after_cancel_fit fires and the learner returns to idle."""


class CancelEpochException(CancelException):
    """Abandon the current pass (training or validation): after_cancel_epoch fires."""


class CancelBatchException(CancelException):
    """Abandon the current batch: after_cancel_batch fires and the next batch starts."""


class FsmLearnerError(Exception):
    """Base class of every error fsm_learner raises."""


class ConfigurationError(FsmLearnerError, ValueError):
    """A setting has a value outside what is valid (a negative epoch count, say)."""


class InvalidCallbackError(FsmLearnerError, TypeError):
    """A callback is not a Callback, has a bad order, or a misspelt hook."""


class InvalidDataLoadersError(FsmLearnerError, TypeError):
    """The dls given to a Learner do not have re-iterable .train and .valid."""


class InvalidBatchError(FsmLearnerError, TypeError):
    """A batch, or a model's output, has no part the loop needs (a target, a loss)."""


class CheckpointError(FsmLearnerError, ValueError):
    """A checkpoint that cannot be read or resumed from: the message names the file."""


class DistributedError(FsmLearnerError, RuntimeError):
    """The ranks of a distributed fit cannot go on together; every rank fails with it."""


class RankFailedError(DistributedError):
    """Another rank failed: this rank takes ``fail`` too. The message names the rank and its error.

    ``rank`` is the rank that failed (the lowest, when several failed at once), ``at``
    where this rank heard of it, ``error`` what that rank said of its exception.
    """

    def __init__(self, message: str, rank: int, at: str, error: str) -> None:
        """Keep the message, the rank that failed, where it was heard of, and its error."""
        super().__init__(message)
        self.rank = rank
        self.at = at
        self.error = error


class RankLostError(DistributedError):
    """A rank stopped answering (it died, or hung past the timeout). ``ranks``: which."""

    def __init__(self, message: str, ranks: tuple[int, ...]) -> None:
        """Keep the message and the ranks that did not answer (empty: none could be named)."""
        super().__init__(message)
        self.ranks = ranks


class DivergenceError(DistributedError):
    """The ranks' paths differ: the message names the first transition where they part."""


class TerminatedError(FsmLearnerError, RuntimeError):
    """SIGTERM during a fit across ranks with no checkpointing callback: the fit fails.

    torchrun sends it to every worker of a node once one fails; the log still closes,
    and the other ranks are told.
    """


class NoRunError(FsmLearnerError, LookupError):
    """A log given to read one run from holds no run at all: a failed check, as its audit fails.

    ``fsm-learner audit --diff`` exits 1 for it (a check failed), not 2 (a usage error).
    """


class InvalidTransitionError(FsmLearnerError, RuntimeError):
    """A trigger was fired in a state the transition table does not allow it from."""


class IllegalCancelError(InvalidTransitionError):
    """A cancel was raised where its cancel transition is not allowed.

    Raised ``from`` the cancel itself, naming the hook and the state.
    """


class FsmLearnerWarning(UserWarning):
    """Base class of every warning fsm_learner issues."""


class PartialResultWarning(FsmLearnerWarning, RuntimeWarning):
    """``validate`` or ``get_preds`` was cancelled: what it returns covers part of the data."""


class ResumeWarning(FsmLearnerWarning, RuntimeWarning):
    """A resume that fell back to an older checkpoint, or that may not be exact."""


class DistributedWarning(FsmLearnerWarning, RuntimeWarning):
    """A loader the learner could not give each rank its own share of: left as it was."""
