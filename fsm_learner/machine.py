"""The training loop's state machine, declared once as data.

``TRANSITION_TABLE`` is the single source of truth for the shape of the loop: the
learner's hot path, the diagrams, the audit replay and the tests all read it. From it
this module builds a ``transitions.Machine`` (flat, ``auto_transitions=False``) and
compiles, off that machine's events, the routing table the learner uses per batch:
firing a ``transitions`` trigger costs about 8 µs, too much for 5-7 triggers on a
batch of a few hundred µs, while a compiled route is a dictionary lookup. A property
test proves that both accept the same trigger sequences and end in the same states.

Run kinds: a fit (``Learner.fit``) trains and validates; a validate run
(``Learner.validate``) and a predict run (``Learner.get_preds``) are one pass over a
data loader without gradients, entered from ``idle`` straight into ``epoch``. Guards
read the run's kind and ``learn.training``, so a validate run never reaches backward or
step and a predict run ends its batches after ``predict``. Routes are compiled per mode
(kind and training).

Hook timing: a unit of work (fit, epoch pass, batch) is in progress from its
``before_X`` to the end of its ``after_X``, as in the seed. So the hooks of the
``end_*`` transitions run *before* the state changes (a ``CancelBatchException`` raised
in ``after_batch`` still cancels that batch); every other transition runs its hooks
*after* the state changed (``before_batch`` runs in state ``batch``).

Cleanup hooks: a transition that leaves units of work (the batch, the pass, the fit)
runs, after its own hook and the state change, the ``cleanup_*`` hook of every unit it
leaves, innermost first, whatever the route: completed, cancelled or failed. Which units
a transition leaves follows from its source and destination states (``cleanup_hooks``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import attrs
from transitions import EventData, Machine

from fsm_learner._compat import StrEnum
from fsm_learner.exceptions import (
    CancelBatchException,
    CancelEpochException,
    CancelException,
    CancelFitException,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "GUARDS",
    "HOOK_OF",
    "MODES",
    "TIMING_OF",
    "TRANSITION_TABLE",
    "Guard",
    "Hook",
    "HookTiming",
    "MachineModel",
    "Mode",
    "Routes",
    "RunKind",
    "State",
    "TransitionSpec",
    "Trigger",
    "build_machine",
    "cancel_names",
    "cancel_trigger",
    "cleanup_hooks",
    "compile_routes",
    "table_digest",
    "table_routes",
]


class RunKind(StrEnum):
    """What a run of the machine does; the log header's ``kind``."""

    FIT = "fit"
    VALIDATE = "validate"
    PREDICT = "predict"


class State(StrEnum):
    """Where the loop is. ``learn.state == "idle"`` holds because these are strs."""

    IDLE = "idle"
    FIT = "fit"
    EPOCH = "epoch"
    BATCH = "batch"
    PREDICT = "predict"
    LOSS = "loss"
    BACKWARD = "backward"
    STEP = "step"


class Trigger(StrEnum):
    """What moves the loop from one state to the next."""

    BEGIN_FIT = "begin_fit"
    BEGIN_EPOCH = "begin_epoch"
    BEGIN_BATCH = "begin_batch"
    PREDICT = "predict"
    COMPUTE_LOSS = "compute_loss"
    BACKWARD = "backward"
    STEP = "step"
    END_BATCH = "end_batch"
    END_EPOCH = "end_epoch"
    END_FIT = "end_fit"
    CANCEL_BATCH = "cancel_batch"
    CANCEL_EPOCH = "cancel_epoch"
    CANCEL_FIT = "cancel_fit"
    PREEMPT = "preempt"
    FAIL = "fail"


class Hook(StrEnum):
    """The callback hooks; each transition of the table fires exactly one of them."""

    BEFORE_FIT = "before_fit"
    BEFORE_EPOCH = "before_epoch"
    BEFORE_BATCH = "before_batch"
    AFTER_PREDICT = "after_predict"
    AFTER_LOSS = "after_loss"
    AFTER_BACKWARD = "after_backward"
    AFTER_STEP = "after_step"
    AFTER_BATCH = "after_batch"
    AFTER_EPOCH = "after_epoch"
    AFTER_FIT = "after_fit"
    AFTER_CANCEL_BATCH = "after_cancel_batch"
    AFTER_CANCEL_EPOCH = "after_cancel_epoch"
    AFTER_CANCEL_FIT = "after_cancel_fit"
    AFTER_PREEMPT = "after_preempt"
    AFTER_FAIL = "after_fail"
    CLEANUP_BATCH = "cleanup_batch"
    CLEANUP_EPOCH = "cleanup_epoch"
    CLEANUP_FIT = "cleanup_fit"


class Guard(StrEnum):
    """Conditions on a transition besides its source state: predicates of the mode."""

    FITTING = "fitting"
    """The run is a fit."""
    INFERRING = "inferring"
    """The run is a validate or predict run: one pass, no fit around it."""
    TRAINING = "training"
    """A fit's training pass: backward and step follow the loss."""
    VALIDATING = "validating"
    """A pass that computes the loss without gradients (a fit's validation, or validate)."""
    PREDICTING = "predicting"
    """A predict run's pass: the batch ends after the forward pass, no loss."""
    SUPERVISED = "supervised"
    """The run computes a loss: a fit or a validate run."""


class HookTiming(StrEnum):
    """Whether a transition's hooks run before or after its state change."""

    BEFORE_CHANGE = "before_change"
    AFTER_CHANGE = "after_change"


@attrs.frozen
class TransitionSpec:
    """One row of the transition table."""

    trigger: Trigger
    sources: tuple[State, ...]
    dest: State
    hook: Hook
    timing: HookTiming = HookTiming.AFTER_CHANGE
    guard: Guard | None = None
    cancel: type[CancelException] | None = None
    """The cancel exception that takes this transition, for cancel transitions."""


_IN_BATCH: Final = (State.BATCH, State.PREDICT, State.LOSS, State.BACKWARD, State.STEP)
_IN_EPOCH: Final = (State.EPOCH, *_IN_BATCH)
_IN_FIT: Final = (State.FIT, *_IN_EPOCH)

_T = TransitionSpec
_BEFORE = HookTiming.BEFORE_CHANGE

TRANSITION_TABLE: Final[tuple[TransitionSpec, ...]] = (
    _T(Trigger.BEGIN_FIT, (State.IDLE,), State.FIT, Hook.BEFORE_FIT, guard=Guard.FITTING),
    _T(Trigger.BEGIN_EPOCH, (State.FIT,), State.EPOCH, Hook.BEFORE_EPOCH),
    _T(Trigger.BEGIN_EPOCH, (State.IDLE,), State.EPOCH, Hook.BEFORE_EPOCH, guard=Guard.INFERRING),
    _T(Trigger.BEGIN_BATCH, (State.EPOCH,), State.BATCH, Hook.BEFORE_BATCH),
    _T(Trigger.PREDICT, (State.BATCH,), State.PREDICT, Hook.AFTER_PREDICT),
    _T(Trigger.COMPUTE_LOSS, (State.PREDICT,), State.LOSS, Hook.AFTER_LOSS, guard=Guard.SUPERVISED),
    _T(Trigger.BACKWARD, (State.LOSS,), State.BACKWARD, Hook.AFTER_BACKWARD, guard=Guard.TRAINING),
    _T(Trigger.STEP, (State.BACKWARD,), State.STEP, Hook.AFTER_STEP),
    _T(Trigger.END_BATCH, (State.STEP,), State.EPOCH, Hook.AFTER_BATCH, _BEFORE),
    _T(
        Trigger.END_BATCH,
        (State.LOSS,),
        State.EPOCH,
        Hook.AFTER_BATCH,
        _BEFORE,
        guard=Guard.VALIDATING,
    ),
    _T(
        Trigger.END_BATCH,
        (State.PREDICT,),
        State.EPOCH,
        Hook.AFTER_BATCH,
        _BEFORE,
        guard=Guard.PREDICTING,
    ),
    _T(Trigger.END_EPOCH, (State.EPOCH,), State.FIT, Hook.AFTER_EPOCH, _BEFORE, Guard.FITTING),
    _T(Trigger.END_EPOCH, (State.EPOCH,), State.IDLE, Hook.AFTER_EPOCH, _BEFORE, Guard.INFERRING),
    _T(Trigger.END_FIT, (State.FIT,), State.IDLE, Hook.AFTER_FIT, _BEFORE),
    _T(
        Trigger.CANCEL_BATCH,
        _IN_BATCH,
        State.EPOCH,
        Hook.AFTER_CANCEL_BATCH,
        cancel=CancelBatchException,
    ),
    _T(
        Trigger.CANCEL_EPOCH,
        _IN_EPOCH,
        State.FIT,
        Hook.AFTER_CANCEL_EPOCH,
        guard=Guard.FITTING,
        cancel=CancelEpochException,
    ),
    _T(
        Trigger.CANCEL_EPOCH,
        _IN_EPOCH,  # backward and step too, though a validate or predict run never gets there
        State.IDLE,
        Hook.AFTER_CANCEL_EPOCH,
        guard=Guard.INFERRING,
        cancel=CancelEpochException,
    ),
    _T(Trigger.CANCEL_FIT, _IN_FIT, State.IDLE, Hook.AFTER_CANCEL_FIT, cancel=CancelFitException),
    # a fit asked to stop (SIGTERM) checkpoints at the next boundary, between two batches
    # or two passes, and stops there: the checkpoint resumes it
    _T(
        Trigger.PREEMPT,
        (State.FIT, State.EPOCH),
        State.IDLE,
        Hook.AFTER_PREEMPT,
        guard=Guard.FITTING,
    ),
    _T(Trigger.FAIL, tuple(State), State.IDLE, Hook.AFTER_FAIL),
)
"""The loop, as data. Rows with the same trigger are tried in order, as in transitions."""

Mode = tuple[RunKind, bool]
"""What the guards read: the run's kind and ``learn.training``."""

MODES: Final[tuple[Mode, ...]] = (
    (RunKind.FIT, True),
    (RunKind.FIT, False),
    (RunKind.VALIDATE, False),
    (RunKind.PREDICT, False),
)
"""The modes a run can be in: only a fit has training passes."""

GUARDS: Final[Mapping[Guard, Callable[[RunKind, bool], bool]]] = MappingProxyType(
    {
        Guard.FITTING: lambda kind, _training: kind is RunKind.FIT,
        Guard.INFERRING: lambda kind, _training: kind is not RunKind.FIT,
        Guard.TRAINING: lambda kind, training: kind is RunKind.FIT and training,
        Guard.VALIDATING: lambda kind, training: kind is not RunKind.PREDICT and not training,
        Guard.PREDICTING: lambda kind, _training: kind is RunKind.PREDICT,
        Guard.SUPERVISED: lambda kind, _training: kind is not RunKind.PREDICT,
    },
)
"""Each guard as a predicate of the run's kind and ``learn.training``."""

_UNIT_CLEANUP: Final = (
    (State.FIT, Hook.CLEANUP_FIT),
    (State.EPOCH, Hook.CLEANUP_EPOCH),
    (State.BATCH, Hook.CLEANUP_BATCH),
)
"""The units of work, outermost first: the state that opens each, and its cleanup hook."""
_DEPTH: Final[Mapping[State, int]] = MappingProxyType(
    {State.IDLE: 0, State.FIT: 1, State.EPOCH: 2} | dict.fromkeys(_IN_BATCH, 3),
)


def _open_units(state: State, kind: RunKind) -> list[Hook]:
    """Return the cleanup hooks of the units open in ``state``, innermost first."""
    depth = _DEPTH[state]
    return [
        hook
        for level, (opener, hook) in enumerate(_UNIT_CLEANUP, start=1)
        if level <= depth and (opener is not State.FIT or kind is RunKind.FIT)
    ][::-1]


def cleanup_hooks(source: State, dest: State, kind: RunKind) -> tuple[Hook, ...]:
    """Return the cleanup hooks a transition from ``source`` to ``dest`` runs, innermost first.

    Those of the units open in ``source`` and no longer open in ``dest``: ``end_batch``
    runs ``cleanup_batch``; ``cancel_fit`` from a batch runs ``cleanup_batch``,
    ``cleanup_epoch``, ``cleanup_fit``; a validate run never opens a fit.
    """
    still_open = set(_open_units(dest, kind))
    return tuple(hook for hook in _open_units(source, kind) if hook not in still_open)


HOOK_OF: Final[Mapping[Trigger, Hook]] = MappingProxyType(
    {spec.trigger: spec.hook for spec in TRANSITION_TABLE},
)
TIMING_OF: Final[Mapping[Trigger, HookTiming]] = MappingProxyType(
    {spec.trigger: spec.timing for spec in TRANSITION_TABLE},
)
_CANCELS: Final = tuple((spec.cancel, spec.trigger) for spec in TRANSITION_TABLE if spec.cancel)


def cancel_trigger(cancel: CancelException) -> Trigger | None:
    """Return the cancel transition ``cancel`` asks for (subclasses included), or None.

    None for the base class itself, or a subclass of it that is none of the three.
    """
    for exc_type, trigger in _CANCELS:
        if isinstance(cancel, exc_type):
            return trigger
    return None


def cancel_names() -> str:
    """Name the cancel exceptions that take a transition, for error messages."""
    return ", ".join(exc.__name__ for exc, _ in _CANCELS)


@cache
def table_routes() -> Mapping[Mode, Routes]:
    """Return the routes compiled off the machine built from the table, built once."""
    return compile_routes(build_machine())


@cache
def table_digest() -> str:
    """Return a BLAKE2b digest of the table, so a log can name the machine it ran on."""
    rows = "\n".join(
        f"{s.trigger}|{','.join(s.sources)}|{s.dest}|{s.hook}|{s.timing}|{s.guard or ''}"
        for s in TRANSITION_TABLE
    )
    return hashlib.blake2b(rows.encode(), digest_size=16).hexdigest()


@attrs.define(slots=False)  # transitions attaches trigger methods to its model
class MachineModel:
    """The object a ``transitions.Machine`` drives: the state, and the mode guards read."""

    state: str = State.IDLE.value
    kind: RunKind = RunKind.FIT
    training: bool = True


def _guard_condition(guard: Guard) -> Callable[[EventData], bool]:
    predicate = GUARDS[guard]

    def condition(event: EventData) -> bool:
        model = event.model
        if not isinstance(model, MachineModel):
            msg = f"the machine's model must be a MachineModel, got {type(model).__name__}"
            raise TypeError(msg)
        return predicate(model.kind, model.training)

    condition.__name__ = str(guard)
    return condition


def _transition_kwargs(spec: TransitionSpec) -> dict[str, Any]:
    conditions = [_guard_condition(spec.guard)] if spec.guard else []
    return {
        "trigger": spec.trigger.value,
        "source": [s.value for s in spec.sources],
        "dest": spec.dest.value,
        "conditions": conditions,
    }


def _quiet_transitions_logging() -> None:
    # transitions logs INFO on every state entry. Quiet its own logger unless the
    # application already chose a level for it; the root logger is never touched.
    lib_logger = logging.getLogger("transitions")
    if lib_logger.level == logging.NOTSET:
        lib_logger.setLevel(logging.WARNING)


def build_machine(
    model: MachineModel | None = None,
    *,
    machine_cls: type[Machine] = Machine,
    **kwargs: Any,
) -> Machine:
    """Build the ``transitions`` machine from ``TRANSITION_TABLE``.

    ``machine_cls`` and ``kwargs`` let the diagrams build a ``GraphMachine`` from the
    same table; the loop never uses that one.
    """
    _quiet_transitions_logging()
    return machine_cls(
        model=model if model is not None else MachineModel(),
        states=[s.value for s in State],
        transitions=[_transition_kwargs(spec) for spec in TRANSITION_TABLE],
        initial=State.IDLE.value,
        auto_transitions=False,
        send_event=True,
        **kwargs,
    )


Routes = Mapping[State, Mapping[Trigger, State]]
"""For one mode: state -> trigger -> destination."""


def compile_routes(machine: Machine) -> Mapping[Mode, Routes]:
    """Read the routing table off a built machine's events, for every mode.

    Each (state, trigger) maps to the destination of the first of its transitions whose
    conditions pass, exactly as ``Machine`` resolves it when the trigger fires.
    """
    return MappingProxyType({mode: _routes_for(machine, mode) for mode in MODES})


def _routes_for(machine: Machine, mode: Mode) -> Routes:
    kind, training = mode
    model = MachineModel(kind=kind, training=training)
    routes: dict[State, dict[Trigger, State]] = {state: {} for state in State}
    for name, event in machine.events.items():
        for source, candidates in event.transitions.items():
            data = EventData(machine.get_state(source), event, machine, model, (), {})
            for candidate in candidates:
                if candidate.dest is None:  # an internal transition: the table declares none
                    continue
                if all(cond.check(data) for cond in candidate.conditions):
                    routes[State(source)][Trigger(name)] = State(candidate.dest)
                    break
    return MappingProxyType({state: MappingProxyType(r) for state, r in routes.items()})
