"""The Learner: the loop that drives the machine, and DataLoaders.

Every state change goes through ``Learner._fire``: it looks the trigger up in the
routes compiled from ``TRANSITION_TABLE`` (an illegal trigger raises), runs the
transition's hooks in order before or after the change as the table says, then the
cleanup hooks of the units it leaves, and numbers the transition. Nothing else changes
``learn.state``. ``fit``, ``validate`` and ``get_preds`` are the three kinds of run.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from enum import Enum
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NoReturn

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from fsm_learner._compat import add_note
from fsm_learner._display import exception_text, safe_text
from fsm_learner.audit.codec import (
    KEY_ENV,
    FailureField,
    Field,
    RouteKey,
    RunStatus,
    derive_key,
)
from fsm_learner.audit.writer import emit_run_event
from fsm_learner.batch import (
    DEFAULT_TARGET_KEY,
    batch_target,
)
from fsm_learner.callback import (
    Callback,
    Dispatch,
    HookCall,
    MetricsProvider,
    Override,
    resolve_dispatch,
    validate_callbacks,
)
from fsm_learner.checkpoint import (
    FORMAT,
    VERSION,
    Checkpoint,
    Checkpointer,
    Position,
    callback_keys,
    callback_states,
    check_callbacks,
    check_gradients,
    check_model,
    find_latest,
    gradients,
    load_callbacks,
    load_loader_state,
    load_model,
    loader_generators,
    loader_snapshot,
    logged_path,
    read_checkpoint,
    restore_generators,
    rng_state,
    set_gradients,
    set_rng_state,
    skip_batches,
    stateful,
    unwrap_model,
    write_atomic,
)
from fsm_learner.distributed import (
    LOCAL,
    Agreement,
    AgreePoint,
    Distributed,
    Proposal,
    World,
    as_distributed,
    distributed_loader,
    first_difference,
    set_sampler_epoch,
    start_world,
    wrap_model,
)
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
    IllegalCancelError,
    InvalidCallbackError,
    InvalidDataLoadersError,
    InvalidTransitionError,
    PartialResultWarning,
    RankFailedError,
    ResumeWarning,
    TerminatedError,
)
from fsm_learner.hook_times import (
    HookCalls,
    HookTimes,
    hook_slots,
    note_rows,
    positions_of,
    timed_hooks,
    work_chains,
)
from fsm_learner.inference import Gathered, LossMean
from fsm_learner.machine import (
    HOOK_OF,
    MODES,
    TIMING_OF,
    Hook,
    HookTiming,
    Mode,
    RunKind,
    State,
    Trigger,
    cancel_names,
    cancel_trigger,
    cleanup_hooks,
    table_routes,
)
from fsm_learner.optim import BaseHypers, held_ids
from fsm_learner.run import Run, callable_name, json_setting, optimizer_groups
from fsm_learner.work import DEFAULT_WORK

__all__ = ["DataLoaders", "Failure", "FitResult", "Learner", "OptimizerFactory", "ParamGroups"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""Called as ``opt_func(params, lr)``: ``params`` is what ``param_groups(model)`` returns
(``model.parameters()`` by default), as ``torch.optim`` optimizers take it."""
ParamGroups = Callable[[nn.Module], Iterable[Any]]
"""Called as ``param_groups(model)``: parameters, or parameter groups (dicts), for the optimizer."""


@attrs.frozen
class DataLoaders:
    """The training and validation data: re-iterable collections of batches.

    A batch is a tuple or list (inputs, then the target), a mapping (keyword inputs, and
    the target under the learner's ``target_key``), or one input; see ``fsm_learner.batch``.
    """

    train: Iterable[Any]
    valid: Iterable[Any]


@attrs.frozen
class Failure:
    """What failed the last fit, and where: read it in ``after_fail`` or afterwards."""

    exception: BaseException
    state: State
    hook: Hook | None = None
    callback: Callback | None = None

    def describe(self) -> str:
        """Say where the failure happened, in the words of the exception note."""
        where = f"in state '{self.state}'"
        if self.hook is not None:
            where += f", in hook {self.hook} of {safe_text(type(self.callback).__name__, 200)}"
        return where

    def detail(self) -> dict[FailureField, object]:
        """Return what the footer and the ``run_failed`` event say of it (never raises)."""
        return {
            FailureField.TYPE: safe_text(type(self.exception).__name__, 200),
            FailureField.MESSAGE: safe_text(self.exception),
            FailureField.STATE: str(self.state),
            FailureField.HOOK: None if self.hook is None else str(self.hook),
            FailureField.CALLBACK: None
            if self.callback is None
            else safe_text(type(self.callback).__name__, 200),
        }


@attrs.frozen
class FitResult:
    """What ``fit`` returns: the run's id and status, and where its audit log went."""

    run_id: str
    status: RunStatus
    audit_path: Path | None
    head: str | None
    """The audit chain's head (the footer's hash): keep it elsewhere to check the log later."""


@attrs.define(eq=False)  # not frozen: built 72 times a fit, frozen init costs twice as much
class _Route:
    """A compiled transition for one run: where it goes and which hooks it runs."""

    trigger: Trigger
    dest: State
    hook: Hook
    calls: tuple[tuple[Callback, HookCall], ...]
    cleanups: tuple[tuple[Hook, Callback, HookCall], ...]
    """The cleanup hooks of the units the transition leaves, innermost first."""
    hooks_first: bool
    count_key: tuple[Trigger, bool]
    record: RouteKey
    agree: AgreePoint | None
    """Where ranks agree between this route's hooks and its state change (across ranks)."""
    code: int
    """The trigger and pass as one int: a rank's trail hashes the same in every process."""
    next: _Node = attrs.field(repr=False)
    """The routes out of ``dest`` (same value of training): the hot path follows these."""


_Node = dict[Trigger, _Route]
"""The routes out of one state, by trigger."""
_Routes = Mapping[State, _Node]


def _compile(
    dispatch: Dispatch, kind: RunKind, *, agreeing: bool = False
) -> Mapping[Mode, _Routes]:
    """Attach this run's ordered hooks to the table's routes, for the modes of ``kind``.

    ``agreeing``: the fit runs across ranks, which agree at the end of each unit.
    """
    return MappingProxyType(
        {mode: _compile_for(dispatch, mode, agreeing) for mode in MODES if mode[0] is kind},
    )


_AGREE_AT: Final = MappingProxyType(
    {
        Trigger.END_BATCH: AgreePoint.END_BATCH,
        Trigger.END_EPOCH: AgreePoint.END_EPOCH,
        Trigger.END_FIT: AgreePoint.END_FIT,
    },
)
"""The end of each unit, where ranks agree after its after_ hooks (before the change)."""
_TRIGGERS: Final = tuple(Trigger)
_POINTS: Final = tuple(AgreePoint)


@attrs.frozen
class _RouteShape:
    """What a route is whatever the callbacks: compiled once per mode."""

    source: State
    trigger: Trigger
    dest: State
    hook: Hook
    cleanups: tuple[Hook, ...]
    hooks_first: bool
    count_key: tuple[Trigger, bool]
    record: RouteKey


@cache
def _shapes(mode: Mode) -> tuple[_RouteShape, ...]:
    kind, training = mode
    return tuple(
        _RouteShape(
            source,
            trigger,
            dest,
            HOOK_OF[trigger],
            cleanup_hooks(source, dest, kind),
            TIMING_OF[trigger] is HookTiming.BEFORE_CHANGE,
            (trigger, training),
            (trigger.value, source.value, dest.value, training),
        )
        for source, by_trigger in table_routes()[mode].items()
        for trigger, dest in by_trigger.items()
    )


def _compile_for(dispatch: Dispatch, mode: Mode, agreeing: bool) -> _Routes:
    hooks = dispatch.hooks
    nodes: dict[State, _Node] = {state: {} for state in State}
    for shape in _shapes(mode):
        # the fail route's hooks (after_fail, cleanups) run in the failure path, guarded
        failing = shape.trigger is Trigger.FAIL
        cleanups = tuple((hook, cb, call) for hook in shape.cleanups for cb, call in hooks[hook])
        nodes[shape.source][shape.trigger] = _Route(
            shape.trigger,
            shape.dest,
            shape.hook,
            () if failing else hooks[shape.hook],
            () if failing else cleanups,
            shape.hooks_first,
            shape.count_key,
            shape.record,
            _AGREE_AT.get(shape.trigger) if agreeing else None,
            _TRIGGERS.index(shape.trigger) * 2 + mode[1],
            nodes[shape.dest],
        )
    return MappingProxyType(nodes)


_COUNT_KEYS: Final = tuple((trigger, training) for trigger in Trigger for training in (True, False))


def _zero_counts() -> dict[tuple[Trigger, bool], int]:
    return dict.fromkeys(_COUNT_KEYS, 0)


_MISSING: Final = object()


def _check_dls(dls: object) -> None:
    for name in ("train", "valid"):
        part = getattr(dls, name, _MISSING)
        if not _is_data(part):
            shown = "missing" if part is _MISSING else f"a {type(part).__name__}"
            msg = (
                f"dls must have iterable .train and .valid of batches "
                f"(fsm_learner.DataLoaders(train_dl, valid_dl), say); got {type(dls).__name__} "
                f"whose .{name} is {shown}"
            )
            raise InvalidDataLoadersError(msg)
        _check_reiterable(part, f"dls.{name}")


def _is_data(data: object) -> bool:
    """Whether ``data`` can be batches: iterable, and not a string or a mapping."""
    return isinstance(data, Iterable) and not isinstance(data, str | bytes | Mapping)


def _check_reiterable(data: object, name: str) -> None:
    """Refuse an iterator (a generator, say): it runs dry after one pass."""
    if isinstance(data, Iterator):
        msg = (
            f"{name} is a {safe_text(type(data).__name__, 80)}, an iterator that can be read "
            f"only once: every epoch after the first would run no batch. Pass something "
            f"that can be iterated again: a torch DataLoader, a list of batches, or an object "
            f"whose __iter__ returns a new iterator each time"
        )
        raise InvalidDataLoadersError(msg)


def _check_target_key(target_key: object) -> str:
    if not isinstance(target_key, str) or not target_key:
        msg = (
            f"target_key must be a non-empty str (the target's key in a mapping batch, "
            f"'labels' by default), got {_shown(target_key)}"
        )
        raise ConfigurationError(msg)
    return target_key


def _check_lr(lr: object) -> float:
    value = math.nan
    if not isinstance(lr, bool) and isinstance(lr, int | float):
        try:
            value = float(lr)
        except OverflowError:  # an int beyond any float: 10**400
            value = math.inf
    if not 0 <= value < math.inf:
        msg = f"lr must be a finite number >= 0, got {_shown(lr)} (a float or an int is valid)"
        raise ConfigurationError(msg)
    return value


def _shown(value: object) -> str:
    """Show a received setting: its repr when it is a number or a string, else its type."""
    if isinstance(value, int | float | str):
        try:
            text = repr(value)
        except ValueError:  # an int too long to print
            return "an int of more than 4,300 digits"
        return text if len(text) <= 60 else f"{text[:57]}..."
    return f"a {safe_text(type(value).__name__, 80)}"


def _check_audit_key(key: object) -> bytes | None:
    if key is None or isinstance(key, str | bytes | bytearray):
        return derive_key(key if not isinstance(key, bytearray) else bytes(key))
    msg = (
        f"audit_key must be a str or bytes of any length (it is stretched with BLAKE2b), or "
        f"None to read ${KEY_ENV}; got {type(key).__name__}"
    )
    raise ConfigurationError(msg)


def _check_audit_log(audit_log: object) -> Path | None:
    if audit_log is None:
        return None
    if not isinstance(audit_log, str | os.PathLike):
        msg = (
            f"audit_log must be a directory, a path ending in .jsonl, or None for no log; "
            f"got {type(audit_log).__name__}"
        )
        raise ConfigurationError(msg)
    path = Path(audit_log)
    if not str(audit_log):
        msg = (
            "audit_log is the empty path; give a directory (each fit writes <run_id>.jsonl "
            "into it), a path ending in .jsonl (each fit appends its run), or None for no log"
        )
        raise ConfigurationError(msg)
    _check_log_kind(path)
    return path


def _check_log_kind(path: Path) -> None:
    """Refuse at once an existing path that is neither a directory nor a regular file."""
    try:
        mode = path.stat().st_mode
    except ValueError:  # a NUL byte: no file system takes it
        msg = f"audit_log {safe_text(path, 200)!r} holds a NUL byte; no file can have that name"
        raise ConfigurationError(msg) from None
    except OSError:
        return  # created when the first fit writes
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        msg = (
            f"audit_log {safe_text(path, 200)} exists and is neither a directory nor a "
            "regular file (a FIFO or a device, say); give a directory, a .jsonl file or None"
        )
        raise ConfigurationError(msg)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        msg = f"{name} must be True or False, got {_shown(value)}"
        raise ConfigurationError(msg)
    return value


def _check_n_epochs(n_epochs: object) -> int:
    if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < 0:
        msg = f"n_epochs must be an int >= 0, got {n_epochs!r}"
        raise ConfigurationError(msg)
    return n_epochs


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_CANCEL_OF: Final = MappingProxyType(
    {
        Proposal.BATCH: CancelBatchException,
        Proposal.EPOCH: CancelEpochException,
        Proposal.FIT: CancelFitException,
    },
)
"""The cancel every rank raises when the ranks agreed on a proposal."""


def _proposal(exc: CancelException) -> Proposal:
    trigger = cancel_trigger(exc)
    if trigger is Trigger.CANCEL_BATCH:
        return Proposal.BATCH
    return Proposal.EPOCH if trigger is Trigger.CANCEL_EPOCH else Proposal.FIT


class _PassEnd(Enum):
    """How a pass ended: completed, cancelled, or stopped at a boundary (preempted)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"


def _checkpointers(cbs: Iterable[Callback]) -> tuple[Checkpointer, ...]:
    """Return the callbacks that write checkpoints (a Checkpointer's methods, on the class).

    Not ``isinstance(cb, Checkpointer)``: a runtime protocol check costs about 18 µs a
    callback, this about 0.2 (a fit's fixed cost is some tens of µs).
    """
    return tuple(
        cb
        for cb in cbs
        if callable(getattr(type(cb), "checkpoint_path", None))
        and callable(getattr(type(cb), "checkpoint_written", None))
        and isinstance(cb, Checkpointer)  # only for those: the type checker's narrowing
    )


def _warn_if_inexact(dls: DataLoaders | Any) -> None:
    """Warn of a loader whose order a resume cannot reproduce: persistent workers."""
    for data in (dls.train, dls.valid):
        if getattr(data, "persistent_workers", False) and not stateful(data):
            warnings.warn(
                f"resuming with a {safe_text(type(data).__name__, 80)} with "
                f"persistent_workers=True: its workers draw their seed once, in the pass "
                f"that starts them, so the resumed order may differ; use "
                f"persistent_workers=False (or a StatefulDataLoader) for an exact resume",
                ResumeWarning,
                stacklevel=5,
            )
            return


def _started(iterator: Iterator[Any]) -> Iterator[Any]:
    """Take the first item now (a stateful loader draws its seeds then), and give it first."""
    first = next(iterator, _MISSING)
    return iterator if first is _MISSING else itertools.chain((first,), iterator)


def _check_checkpoint_path(path: object, what: str) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        msg = (
            f"{what}: a checkpoint path must be a non-empty str or os.PathLike, got {_shown(path)}"
        )
        raise ConfigurationError(msg)
    return Path(path)


_NAN: Final = float("nan")
_NO_LOSS: Final = torch.tensor(_NAN)
"""``learn.loss`` until the batch's loss is computed: the loop checks it was replaced."""
_now_ns: Final = time.monotonic_ns


class Learner:
    """Trains ``model`` on ``dls`` with ``loss_func``, driving the transition table.

    Readable in a hook: ``model``, ``opt``, ``dls``, ``dl``, ``loss_func``, ``lr``,
    ``kind``, ``epoch``, ``n_epochs``, ``iter``, ``batch``, ``output``, ``preds``,
    ``target``, ``loss``, ``training``, ``state``. A hook may replace ``batch``,
    ``preds`` and ``loss``; the counters and the state are read-only and change only on
    completed transitions.
    """

    def __init__(  # noqa: PLR0913, PLR0917 (the seed's positional signature)
        self,
        model: nn.Module,
        dls: DataLoaders | Any,
        loss_func: Callable[[Any, Any], torch.Tensor] | None = F.mse_loss,
        lr: float = 0.1,
        cbs: Iterable[Callback] | Callback | None = None,
        opt_func: OptimizerFactory = torch.optim.SGD,
        *,
        target_key: str = DEFAULT_TARGET_KEY,
        param_groups: ParamGroups | None = None,
        audit_log: str | os.PathLike[str] | None = "runs",
        audit_key: bytes | str | None = None,
        distributed: Distributed | bool | None = None,
        profile_hooks: bool = False,
    ) -> None:
        """Check the arguments; nothing runs until ``fit``, ``validate`` or ``get_preds``.

        ``loss_func(preds, target)`` computes a batch's loss; None means the model
        computes its own (``out.loss``), given the whole batch. ``target_key`` names the
        target in mapping batches. The optimizer is built at the first fit as
        ``opt_func(param_groups(model), lr)`` (``param_groups`` defaults to
        ``model.parameters``; ``fsm_learner.optim.weight_decay_groups`` spares biases and
        norms) and kept across fits, unless ``learn.opt`` was set first.
        ``audit_log`` is a directory (each run writes ``<dir>/<run_id>.jsonl``), a
        ``.jsonl`` file (each run appends), or None for no log. ``audit_key`` (default:
        the ``FSM_LEARNER_AUDIT_KEY`` environment variable) keys the hash chain; it is
        never written to the log.
        ``distributed``: under a started torch.distributed process group of more than
        one rank (None, the default), a fit is one run across the ranks
        (``fsm_learner.distributed``); True also starts the group from torchrun's
        environment; False keeps every process on its own; ``Distributed(...)`` sets
        the timeout and what the learner does to the model and loaders.
        ``profile_hooks``: time each callback's hooks; at each pass end (and at the end
        of the run) a ``hook_times`` note in the log gives, per (callback, hook) that
        ran since the last one, the calls and nanoseconds, which ``fsm-learner audit``
        shows per callback. Off, the loop runs exactly as without it.
        """
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module, got {type(model).__name__}"
            raise ConfigurationError(msg)
        _check_dls(dls)
        _check_callable("loss_func", loss_func, optional=True)
        self.model = model
        self._dls = dls
        self.loss_func = loss_func
        self._target_key = _check_target_key(target_key)
        self.param_groups = param_groups
        self._lr = _check_lr(lr)
        self._cbs: list[Callback] = validate_callbacks(cbs)
        self.opt_func = opt_func
        self.opt: torch.optim.Optimizer | None = None
        """Built at the first fit and kept; set it yourself to train with your own."""
        self._built: _Built | None = None
        """What the learner built its optimizer from: rebuilt when that changes."""
        self._hypers: BaseHypers | None = None
        """The optimizer's own hyperparameters, which every fit starts from."""
        self.dl: Iterable[Any] = dls.train
        self.batch: Any = None
        self.output: Any = None
        """The model's output for the batch, as it returned it (``preds`` derive from it)."""
        self.preds: Any = None
        self.loss: torch.Tensor = torch.tensor(_NAN)
        self._init_loop()
        self._audit_log = _check_audit_log(audit_log)
        self._audit_key = _check_audit_key(audit_key)
        self._distributed = as_distributed(distributed)
        self._profile_hooks = _check_bool("profile_hooks", profile_hooks)
        self._run: Run | None = None
        """The current (or last) run."""
        self._last_result: FitResult | None = None
        self._unstepped = False
        self._pending: list[Any] | None = None
        self._checkpointers: tuple[Checkpointer, ...] = ()
        """The callbacks that write checkpoints in this fit (a fit with one is preemptible)."""
        self._boundary_due = False
        """A checkpoint or a preemption waits for the next boundary (checked once per batch)."""
        self._checkpoint_wanted = False
        self._preempt_wanted = False
        self._stop_asked = False
        """Across ranks: this rank got SIGTERM; the next agreement stops every rank."""
        self._resume: Checkpoint | None = None
        """The checkpoint this fit resumes, until the machine is back at its position."""
        self._resumed_from: dict[str, Any] | None = None
        self._pass_start: dict[str, Any] | None = None
        """The generators' states when the current pass began (a mid-pass checkpoint's)."""

    def _init_loop(self) -> None:
        """Set the machine's state before any run: idle, nothing counted, no callback."""
        self._state, self._kind = State.IDLE, RunKind.FIT
        self._epoch = self._n_epochs = self._iter = 0
        self._training = False
        self._rank = 0
        self._world: World = LOCAL
        self._agreeing = False
        """The fit runs across ranks: they agree at the points the distributed module names."""
        self._agree_step = False
        """Across ranks, with after_backward hooks or backward overrides: agree before the step."""
        self._trail: list[tuple[int, int, int]] | None = None
        """Across ranks: the transitions since the ranks last agreed (code, epoch, iter)."""
        self._proposal = Proposal.NONE
        """Across ranks: the cancel a hook raised, which the next agreement decides on."""
        self._agreed: BaseException | None = None
        """The cancel the ranks last agreed on, raised by the agreement (not a proposal)."""
        self._told: BaseException | None = None
        """The failure the other ranks were told of (once, wherever it is caught)."""
        self._user_dls: DataLoaders | Any = None
        """The data as given, while a fit across ranks trains on each rank's share of it."""
        self._user_model: nn.Module | None = None
        """The model as given, while a fit across ranks trains it wrapped in DDP."""
        self._counts: dict[tuple[Trigger, bool], int] = _zero_counts()
        self._hook_ns: dict[tuple[Trigger, bool], int] = _zero_counts()
        self._failure: Failure | None = None
        self._origin: Failure | None = self._failure
        self._dispatch = resolve_dispatch(())
        self._compiled: Mapping[Mode, _Routes] = _compile(self._dispatch, RunKind.FIT)
        self._compiled_for = self._compiled
        self._compiled_key: tuple[object, ...] = ()
        """What ``_compiled_for`` was compiled from (``_dispatch_key``), with the callbacks."""
        self._compiled_times: tuple[HookTimes, HookCalls] | None = None
        """With ``profile_hooks``: the times the compiled routes add to, and their timed hooks."""
        self._hook_times: HookTimes | None = None
        """The current run's times per (callback, hook); None when it does not profile them."""
        self._node: _Node = self._compiled[RunKind.FIT, False][State.IDLE]
        self._fail_source = State.IDLE
        self._predict, self._compute_loss, self._backward, self._step = (
            DEFAULT_WORK[work] for work in Override
        )

    # -- settings, checked whenever they are set ------------------------------------

    @property
    def opt_func(self) -> OptimizerFactory:
        """Builds the optimizer as ``opt_func(param_groups(model), lr)``; checked when set."""
        return self._opt_func

    @opt_func.setter
    def opt_func(self, value: OptimizerFactory) -> None:
        _check_callable("opt_func", value)
        self._opt_func = value

    @property
    def param_groups(self) -> ParamGroups:
        """Gives ``opt_func`` the model's parameters or groups (``model.parameters``)."""
        return self._param_groups

    @param_groups.setter
    def param_groups(self, value: ParamGroups | None) -> None:
        _check_callable("param_groups", value, optional=True)
        self._param_groups = value or _all_parameters

    @property
    def lr(self) -> float:
        """The rate fits start from: once there is an optimizer, its first group's.

        Setting it sets every group's rate (per-group rates become one).
        """
        hypers = self._hypers
        if hypers is not None and hypers.opt is self.opt:
            return hypers.lr
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_lr(value)
        opt, hypers = self.opt, self._hypers
        if opt is not None:
            if hypers is None or hypers.opt is not opt:
                hypers = self._hypers = BaseHypers(opt)
            hypers.set_lr(self._lr)

    @property
    def dls(self) -> DataLoaders | Any:
        """The training and validation data (``.train`` and ``.valid``), checked when set."""
        return self._dls

    @dls.setter
    def dls(self, value: DataLoaders | Any) -> None:
        _check_dls(value)
        self._dls = value

    @property
    def target_key(self) -> str:
        """The target's key in mapping batches ("labels" by default)."""
        return self._target_key

    @target_key.setter
    def target_key(self, value: str) -> None:
        self._target_key = _check_target_key(value)

    @property
    def cbs(self) -> list[Callback]:
        """The callbacks (a list: append to it, or assign any iterable, one Callback or None)."""
        return self._cbs

    @cbs.setter
    def cbs(self, value: Iterable[Callback] | Callback | None) -> None:
        self._cbs = validate_callbacks(value)

    @property
    def audit_log(self) -> Path | None:
        """Where runs write their audit log: a directory, a .jsonl file, or None for none."""
        return self._audit_log

    @audit_log.setter
    def audit_log(self, value: str | os.PathLike[str] | None) -> None:
        self._audit_log = _check_audit_log(value)

    @property
    def profile_hooks(self) -> bool:
        """Whether runs time each callback's hooks (``hook_times`` notes); from the next run."""
        return self._profile_hooks

    @profile_hooks.setter
    def profile_hooks(self, value: bool) -> None:
        self._profile_hooks = _check_bool("profile_hooks", value)

    # -- read-only loop state -------------------------------------------------------

    @property
    def state(self) -> State:
        """The machine's current state."""
        return self._state

    @property
    def kind(self) -> RunKind:
        """What the current (or last) run does: fit, validate or predict."""
        return self._kind

    @property
    def running(self) -> bool:
        """Whether a run is in progress (its closing hooks included)."""
        run = self._run
        return run is not None and run.active

    @property
    def epoch(self) -> int:
        """The current epoch, from 0."""
        return self._epoch

    @property
    def n_epochs(self) -> int:
        """The number of epochs the current (or last) fit was asked for."""
        return self._n_epochs

    @property
    def iter(self) -> int:
        """The index of the current batch within its pass, from 0."""
        return self._iter

    @property
    def training(self) -> bool:
        """True in the training pass, False in the validation pass."""
        return self._training

    @property
    def target(self) -> Any:
        """The current batch's target (None when it has none): see ``fsm_learner.batch``."""
        return batch_target(self.batch, self.target_key)

    @property
    def seq(self) -> int:
        """How many transitions the current (or last) run has made."""
        return sum(self._counts.values())

    @property
    def counts(self) -> Mapping[tuple[Trigger, bool], int]:
        """Transitions made by the current (or last) run, per (trigger, training)."""
        return MappingProxyType(self._counts)

    @property
    def rank(self) -> int:
        """Return the rank of this process under torch.distributed; 0 without it."""
        return self._rank

    @property
    def world(self) -> World:
        """The processes the current (or last) fit runs on (``World``: rank, size, sum)."""
        return self._world

    @property
    def run_id(self) -> str:
        """The id of the current (or last) run; empty before the first run."""
        return "" if self._run is None else self._run.run_id

    @property
    def audit_path(self) -> Path | None:
        """Where the current (or last) run's audit log went; None when logging is off."""
        return None if self._run is None else self._run.path

    @property
    def audit_head(self) -> str | None:
        """The chain head of the last finished run's log (its last seal's digest)."""
        return None if self._run is None else self._run.head

    @property
    def last_result(self) -> FitResult | None:
        """How the last call's run ended (id, status, log, head); None when it started none."""
        return self._last_result

    @property
    def failure(self) -> Failure | None:
        """What failed the last run, or None when it did not fail."""
        return self._failure

    def diagram(self, fmt: str = "mermaid") -> str:
        """Draw the machine with this learner's callbacks on the transitions they run on.

        ``fmt`` is ``"mermaid"``, ``"dot"`` or ``"svg"`` (which needs Graphviz's ``dot``);
        each edge lists the callbacks of its hook in the order they run.
        """
        from fsm_learner.diagram import callbacks_view, render_text  # noqa: PLC0415 (graphs stay off the training path)

        return render_text(callbacks_view(self.cbs), fmt)

    # -- the three kinds of run ------------------------------------------------------

    def fit(
        self,
        n_epochs: int,
        *,
        reset_opt: bool = False,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> FitResult:
        """Train for ``n_epochs`` epochs, each a training pass then a validation pass.

        The loop, as the machine runs it (``[trigger]`` fires the hooks the table
        names; every state change goes through ``_fire``)::

            [begin_fit]                                  idle  -> fit     before_fit
            for epoch in range(n_epochs):
                for training in (True, False):
                    [begin_epoch]                        fit   -> epoch   before_epoch
                    for iter, batch in enumerate(dl):
                        [begin_batch]                    epoch -> batch   before_batch
                        predict (model(*inputs)); [predict]        predict after_predict
                        compute_loss;          [compute_loss]      loss    after_loss
                        if training:
                            backward;          [backward]          backward after_backward
                            step + zero_grad;  [step]              step    after_step
                        [end_batch]   after_batch, then        -> epoch, cleanup_batch
                    [end_epoch]       after_epoch, then        -> fit,   cleanup_epoch
            [end_fit]                 after_fit, then          -> idle,  cleanup_fit

        A CancelXException takes ``cancel_x`` (after_cancel_x fires, after_x does not);
        any other exception takes ``fail`` (after_fail fires) and is re-raised with a
        note saying where it happened. Either way the cleanup hooks of the units left
        run, innermost first. Every transition is written to the audit log, which the
        run's footer closes whatever the outcome: after any exception, even one that
        interrupts the failure handling itself, the learner is idle and reusable.

        The optimizer is built at the first fit (or taken from ``learn.opt``) and kept,
        so ``fit(2); fit(2)`` trains as ``fit(4)``; ``reset_opt=True`` builds a new one.

        ``resume_from`` (a checkpoint file, or a directory: its newest checkpoint that
        reads) finishes the fit a checkpoint was taken in: the same ``n_epochs``, the
        same callbacks. The machine takes ``begin_fit`` (and ``begin_epoch`` when the
        checkpoint is mid-pass), then everything is as it was at the checkpoint (model,
        optimizer, callbacks' states, generators, counters) and the fit goes on from the
        next batch: the final state is the uninterrupted fit's. A directory without any
        checkpoint starts the fit afresh (a restarted worker's first start). With a
        checkpointing callback (``CheckpointCB``), SIGTERM stops the fit at the next
        boundary with a checkpoint: the ``preempt`` transition, status ``preempted``.
        """
        self._last_result = None  # whatever happens next, not the last call's
        self._check_idle("fit()")
        self._world = start_world(self._distributed)
        n_epochs = _check_n_epochs(n_epochs)
        reset_opt = _check_bool("reset_opt", reset_opt)

        def prepare() -> None:  # across ranks, a rank failing here tells the others
            resume = self._resume_point(resume_from, n_epochs, reset_opt=reset_opt)
            self._n_epochs = n_epochs
            self._ready_optimizer(reset=reset_opt)
            self._start_resume(resume)

        restore = self._preemptible()
        try:
            return self._execute(RunKind.FIT, prepare, self._train)
        finally:
            restore()
            self._give_back()
            self._world.check = None  # a reduction after the fit agrees with no loop

    # -- checkpoints -----------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint of the learner at idle: model, optimizer, callbacks, generators.

        ``learn.load(path)`` in another process gives all of it back, so that
        ``fit(2); save(p)`` then ``load(p); fit(2)`` trains as ``fit(4)``. Written
        atomically; returns the path.
        """
        self._check_idle("save()")
        target = _check_checkpoint_path(path, "save")
        write_atomic(target, self._payload(Position(State.IDLE), None))
        return target

    def load(self, path: str | os.PathLike[str], *, strict: bool = True) -> Position:
        """Load a checkpoint (``save``'s, or ``CheckpointCB``'s) at idle; return where it was taken.

        Everything it holds comes back: weights, optimizer (built first if need be),
        callbacks' states, generators. ``strict`` refuses a checkpoint whose callback
        states do not match ``learn.cbs``; ``strict=False`` loads those that match.
        To finish a fit from a mid-fit checkpoint, use ``fit(n, resume_from=path)``.
        """
        self._check_idle("load()")
        strict = _check_bool("strict", strict)
        checkpoint = read_checkpoint(_check_checkpoint_path(path, "load"))
        name = safe_text(checkpoint.path, 300)
        states = checkpoint.payload["callbacks"]
        if strict:
            check_callbacks(self.cbs, states, name)
        load_model(self.model, checkpoint.payload["model"], name)
        if checkpoint.payload.get("optimizer") is not None:
            self._ready_optimizer(reset=False)
            self._load_optimizer(checkpoint, name)
        set_gradients(self.model, checkpoint.payload["grads"], name)
        keys = {key for key, _ in callback_keys(self.cbs)}
        load_callbacks(self.cbs, {k: v for k, v in states.items() if k in keys}, name)
        set_rng_state(checkpoint.payload["rng"])
        self._restore_loaders(checkpoint.payload)
        return checkpoint.position

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint at the fit's next boundary (between two batches or passes).

        ``CheckpointCB`` calls it; the learner then writes where each checkpointing
        callback says, after the batch or pass has ended (every hook of it run).
        """
        if not self.running or self._kind is not RunKind.FIT:
            msg = "request_checkpoint() outside a fit: checkpoints are taken during a fit"
            raise InvalidTransitionError(msg)
        if not self._checkpointers:
            msg = (
                "request_checkpoint(): no callback of this fit writes checkpoints; add "
                "callbacks.CheckpointCB(dir) to learn.cbs"
            )
            raise ConfigurationError(msg)
        self._checkpoint_wanted = self._boundary_due = True

    @property
    def resumed_from(self) -> Mapping[str, Any] | None:
        """What the current (or last) fit resumed: its log header's ``resumed_from``, or None."""
        resumed = self._resumed_from
        return None if resumed is None else MappingProxyType(resumed)

    def _resume_point(
        self, resume_from: object, n_epochs: int, *, reset_opt: bool
    ) -> Checkpoint | None:
        """Read and check the checkpoint to resume, before anything runs (None: a fresh fit)."""
        if resume_from is None:
            return None
        path = _check_checkpoint_path(resume_from, "fit(resume_from=...)")
        if reset_opt:
            msg = (
                "fit(reset_opt=True, resume_from=...) contradict each other: a resumed fit "
                "goes on with the checkpoint's optimizer state"
            )
            raise ConfigurationError(msg)
        if path.suffix == ".pt" or path.is_file():  # a file: it must be there and read
            checkpoint: Checkpoint | None = read_checkpoint(path)
        else:  # a directory, perhaps not made yet (a first start)
            checkpoint = self._newest(path)
        if checkpoint is None:
            emit_run_event("resume_fresh", directory=os.fspath(path))
            return None
        self._check_resumable(checkpoint, n_epochs)
        return checkpoint

    def _newest(self, directory: Path) -> Checkpoint | None:
        """Return the newest checkpoint of ``directory`` that reads; say which did not."""
        world = self._world  # across ranks, each rank resumes its own files
        checkpoint, skipped = find_latest(directory, rank=world.rank, world_size=world.size)
        if checkpoint is None and skipped:
            msg = (
                f"no checkpoint in {safe_text(directory, 300)} can be read "
                f"({len(skipped)} tried); the newest: {skipped[0]}"
            )
            raise CheckpointError(msg)
        if checkpoint is not None and skipped:
            warnings.warn(
                f"resuming from {safe_text(checkpoint.path, 300)}, the newest checkpoint "
                f"that reads; newer ones do not: {'; '.join(skipped)}",
                ResumeWarning,
                stacklevel=4,
            )
        return checkpoint

    def _check_resumable(self, checkpoint: Checkpoint, n_epochs: int) -> None:
        name = safe_text(checkpoint.path, 300)
        at = checkpoint.position
        if at.state is State.IDLE:
            msg = (
                f"checkpoint {name} was saved at idle (Learner.save): there is no fit in it to "
                f"resume; load it with learn.load(path), then call fit"
            )
            raise CheckpointError(msg)
        if checkpoint.n_epochs != n_epochs:
            msg = (
                f"checkpoint {name} was taken in a fit of {checkpoint.n_epochs} epoch(s); resume "
                f"that fit with fit({checkpoint.n_epochs}, resume_from=...), got fit({n_epochs})"
            )
            raise CheckpointError(msg)
        last = at.epoch > n_epochs or (at.epoch == n_epochs and (at.state is State.EPOCH))
        data = self.dls.train if at.training else self.dls.valid
        length = len(data) if isinstance(data, Sized) else None
        beyond = length is not None and at.iter > length
        if last or beyond or (at.state is State.EPOCH and at.iter < 1):
            msg = f"checkpoint {name} holds an impossible position: {at.describe()}"
            if beyond:
                msg += f", in a pass of {length} batch(es)"
            raise CheckpointError(msg)
        if checkpoint.payload.get("optimizer") is None:
            msg = f"checkpoint {name} holds no optimizer state, which a fit in progress has"
            raise CheckpointError(msg)
        check_callbacks(self.cbs, checkpoint.payload["callbacks"], name)
        check_model(self.model, checkpoint.payload["model"], name)
        params = dict(unwrap_model(self.model).named_parameters())
        check_gradients(params, checkpoint.payload["grads"], name)
        _warn_if_inexact(self.dls)

    def _start_resume(self, checkpoint: Checkpoint | None) -> None:
        """Put back what the fit starts from (weights, optimizer, gradients); the rest waits."""
        self._resume = checkpoint
        if checkpoint is None:
            return
        name = safe_text(checkpoint.path, 300)
        load_model(self.model, checkpoint.payload["model"], name)
        self._load_optimizer(checkpoint, name)
        run = checkpoint.run or {}
        self._resumed_from = {
            "run": run.get("id", ""),
            "records": run.get("records"),
            "head": run.get("head"),
            "sha256": checkpoint.sha256,
            "path": logged_path(checkpoint.path),
            "at": checkpoint.position.to_json(),
        }

    def _load_optimizer(self, checkpoint: Checkpoint, name: str) -> None:
        saved, opt = checkpoint.payload.get("optimizer"), self.opt
        if saved is None or opt is None:
            return
        kind = checkpoint.payload.get("opt_type")
        if kind != type(opt).__name__:
            msg = (
                f"checkpoint {name} holds the state of a {kind} optimizer; learn.opt is a "
                f"{type(opt).__name__}: build the same optimizer (opt_func) to resume"
            )
            raise CheckpointError(msg)
        try:
            opt.load_state_dict(saved)
            hypers = self._hypers
            if hypers is not None and checkpoint.payload.get("hypers") is not None:
                hypers.load_state_dict(checkpoint.payload["hypers"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            msg = f"checkpoint {name}: its optimizer state does not fit learn.opt: {exc}"
            raise CheckpointError(msg) from exc

    def _reenter(self) -> None:
        """Back at the checkpoint's position: give the callbacks, generators and counters back."""
        checkpoint, self._resume = self._resume, None
        if checkpoint is None:
            return
        payload = checkpoint.payload
        name = safe_text(checkpoint.path, 300)
        load_callbacks(self.cbs, payload["callbacks"], name)
        set_gradients(self.model, payload["grads"], name)  # after before_epoch, which may zero them
        set_rng_state(payload["rng"])
        self._restore_loaders(payload)
        self._epoch, self._iter = payload["position"].get("loop", (self._epoch, self._iter))
        counts = _zero_counts()
        for trigger, training, n in payload["position"].get("counts", ()):
            counts[Trigger(trigger), bool(training)] = int(n)
        self._counts = counts

    def _restore_loaders(self, payload: Mapping[str, Any]) -> None:
        """Give both loaders' generators their states at the checkpoint back."""
        loaders = payload.get("loaders") or {}
        for name, data in (("train", self.dls.train), ("valid", self.dls.valid)):
            if loaders.get(name) is not None:
                restore_generators(data, loaders[name])

    def _payload(self, at: Position, sealed: tuple[int, str] | None) -> dict[str, Any]:
        """Return what a checkpoint at ``at`` holds (``sealed``: the log's records and head)."""
        opt, hypers, run = self.opt, self._hypers, self._run
        fitting = at.state is not State.IDLE
        rng = rng_state()
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "model": unwrap_model(self.model).state_dict(),
            "grads": gradients(self.model),
            "optimizer": None if opt is None else opt.state_dict(),
            "opt_type": None if opt is None else type(opt).__name__,
            "hypers": None if hypers is None or hypers.opt is not opt else hypers.state_dict(),
            "callbacks": callback_states(self.cbs),
            "rng": rng,
            "position": {
                "state": at.state.value,
                "epoch": at.epoch,
                "training": at.training,
                "iter": at.iter,
                "n_epochs": self._n_epochs if fitting else 0,
                "loop": [self._epoch, self._iter],  # the counters hooks read, as they are
                "counts": [[t.value, tr, n] for (t, tr), n in self._counts.items() if n]
                if fitting
                else [],
            },
            "pass": dict(self._pass_start or {}) if at.state is State.EPOCH else None,
            "loaders": {  # the state of the loader of a pass in progress only: asking
                # another for its state_dict may start an iterator and change its next pass
                name: loader_snapshot(data, with_state=at.state is State.EPOCH and data is self.dl)
                for name, data in (("train", self.dls.train), ("valid", self.dls.valid))
            },
            "run": {
                "id": run.run_id,
                "records": None if sealed is None else sealed[0],
                "head": None if sealed is None else sealed[1],
            }
            if fitting and run is not None
            else None,
            "meta": {"torch": str(torch.__version__), "model": type(self.model).__name__},
        }
        set_rng_state(rng)  # taking it draws nothing (a stateful loader's state_dict may)
        return payload

    def _preemptible(self) -> Callable[[], None]:
        """Let SIGTERM preempt the fit (with a checkpointing callback, in the main thread).

        Return what puts the previous handler back. Not a context manager: one would
        assign the traceback of what it lets through, which a frozen exception refuses.
        """
        self._boundary_due = self._checkpoint_wanted = self._preempt_wanted = False
        self._stop_asked = False
        if threading.current_thread() is not threading.main_thread() or not (
            self._world.distributed or _checkpointers(self._cbs)
        ):
            return _nothing
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

        def restore() -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

        return restore

    def _on_sigterm(self, _signum: int, _frame: object) -> None:
        if self._world.distributed and not self._checkpointers:
            # torchrun stops every worker once one fails: fail, closing the log, not die
            msg = (
                f"rank {self._world.rank} was sent SIGTERM during a fit across ranks (torchrun "
                f"stops every worker once one fails); no checkpointing callback to preempt with"
            )
            raise TerminatedError(msg)
        if self._world.distributed:  # every rank stops at the same boundary: agreed first
            self._stop_asked = True
            return
        self._preempt_wanted = self._boundary_due = True

    def _at_boundary(self, at: Position) -> bool:
        """At a boundary: take the checkpoint asked for; say whether the fit stops (preempted)."""
        self._boundary_due = False
        wanted, self._checkpoint_wanted = self._checkpoint_wanted, False
        if self._kind is not RunKind.FIT or not self._checkpointers:
            self._preempt_wanted = False
            return False
        preempt = self._preempt_wanted
        if wanted or preempt:
            self._checkpoint(at)
            preempt = self._preempt_wanted  # a SIGTERM during the write: this one serves it
        return preempt

    def _checkpoint(self, at: Position) -> None:
        """Seal the log, write each checkpointer's file, note each in the log, seal again."""
        run = self._the_run()
        sealed = run.seal()
        paths = [cb.checkpoint_path(self, at) for cb in self._checkpointers]
        payload = self._payload(at, sealed)
        for cb, path in zip(self._checkpointers, paths, strict=True):
            digest = write_atomic(path, payload)
            if sealed is not None:
                records, head = sealed
                at_json = at.to_json()
                self.note(
                    "resume_point",
                    path=logged_path(path),
                    sha256=digest,
                    records=records,
                    head=head,
                    at=at_json,
                )
            cb.checkpoint_written(self, path)
        run.seal()

    def validate(self, dl: Iterable[Any] | None = None) -> dict[str, float]:
        """Run one pass without gradients over ``dl`` (default ``dls.valid``); return its values.

        A run of kind ``validate``: ``idle -> epoch``, the batches as in a validation
        pass (predict, compute_loss, never backward or step), ``epoch -> idle``, with the
        callbacks and its own audit log. Returns ``"loss"``, the mean over samples of the
        batches' losses, and the values a metrics callback (``MetricsCB``) computed for
        the pass, by name (``"accuracy"``). The weights and the optimizer are untouched.
        """
        mean = LossMean(self.target_key)
        self._inference_run(RunKind.VALIDATE, dl, mean.add)
        return {"loss": mean.value(), **self._pass_metrics()}

    def get_preds(
        self, dl: Iterable[Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the predictions and targets of every batch of ``dl`` (default ``dls.valid``).

        A run of kind ``predict``: ``idle -> epoch``, each batch ``batch -> predict ->
        epoch`` (no loss, no backward, no step), ``epoch -> idle``, with the callbacks
        and its own audit log. Predictions and targets are concatenated in batch order,
        on the CPU; the targets are None when the batches have none.
        """
        gathered = Gathered(self.target_key)
        self._inference_run(RunKind.PREDICT, dl, gathered.add)
        return gathered.result()

    def _inference_run(
        self, kind: RunKind, dl: Iterable[Any] | None, on_batch: Callable[[Learner], None]
    ) -> None:
        """Run one pass over ``dl`` as ``kind``, handing each completed batch to ``on_batch``."""
        what = _ENTRY_POINT[kind]
        self._last_result = None  # whatever happens next, not the last call's
        self._check_idle(f"{what}()")
        data = self._inference_data(dl, what)
        result = self._execute(kind, _nothing, lambda: self._infer(data, on_batch))
        self._warn_if_partial(result, what)

    def _ready_optimizer(self, *, reset: bool) -> None:
        """Build the optimizer, or keep it; either way start from its own hyperparameters.

        Kept unless ``reset``, or the learner built it and what it was built from changed
        (``opt_func``, ``param_groups``, or the parameters ``param_groups(model)`` gives:
        another model, say). An optimizer the user set is kept, but must hold some of the
        model's parameters.
        """
        opt, built = self.opt, self._built
        if opt is not None and not isinstance(opt, torch.optim.Optimizer):
            msg = (
                f"learn.opt must be a torch.optim.Optimizer, or None to build one from opt_func "
                f"at the next fit; got {_shown(opt)}"
            )
            raise ConfigurationError(msg)
        params = self._params()
        learners = built is not None and built[0] is opt
        if reset or opt is None or (learners and built != self._built_from(opt, params)):
            opt = self._build_optimizer(params)
        elif not learners and not held_ids(params) & _opt_ids(opt):
            msg = (
                f"learn.opt ({type(opt).__name__}) holds none of learn.model's parameters (set "
                f"for another model?): set learn.opt to an optimizer of this model's "
                f"parameters, or call fit(..., reset_opt=True) to build one from opt_func"
            )
            raise ConfigurationError(msg)
        hypers = self._hypers
        if hypers is None or hypers.opt is not opt:
            hypers = self._hypers = BaseHypers(opt)  # a user's optimizer, adopted as it is
        hypers.restore()

    def _params(self) -> list[Any]:
        """Return what ``param_groups(model)`` gives, as a list; refuse what is none."""
        what = (
            "; it must return the model's parameters, or parameter groups (dicts with "
            "'params'), for opt_func"
        )
        try:
            given = self.param_groups(self.model)
            params = None if isinstance(given, Mapping | nn.Module | torch.Tensor) else list(given)
        except Exception as exc:
            msg = f"param_groups(model) raised {exception_text(exc, 300)}{what}"
            raise ConfigurationError(msg) from exc
        if params is None:
            msg = (
                f"param_groups(model) returned one {type(given).__name__}{what} (wrap one group "
                f"or parameter in a list)"
            )
            raise ConfigurationError(msg)
        return params

    def _built_from(self, opt: torch.optim.Optimizer, params: list[Any]) -> _Built:
        return (opt, self.opt_func, self.param_groups, held_ids(params))

    def _build_optimizer(self, params: list[Any]) -> torch.optim.Optimizer:
        try:
            opt = self.opt_func(params, self.lr)
        except Exception as exc:
            msg = (
                f"building the optimizer failed: opt_func(param_groups(model), lr) raised "
                f"{exception_text(exc, 300)} (opt_func={safe_text(self.opt_func, 80)}, "
                f"{len(held_ids(params))} parameter(s) from param_groups); opt_func is called "
                f"as opt_func(params, lr) with what param_groups(model) returns"
            )
            raise ConfigurationError(msg) from exc
        if not isinstance(opt, torch.optim.Optimizer):
            msg = f"opt_func must return a torch.optim.Optimizer, got {_shown(opt)}"
            raise ConfigurationError(msg)
        self.opt, self._built = opt, self._built_from(opt, params)
        self._hypers = BaseHypers(opt)
        return opt

    def _warn_if_partial(self, result: FitResult, what: str) -> None:
        if result.status is not RunStatus.CANCELLED:
            return
        done = self._counts[Trigger.END_BATCH, False]
        warnings.warn(
            f"{what}() was cancelled (a callback raised a cancel) after {done} completed "
            f"batch(es): what it returns covers those batches only; learn.last_result "
            f"says so too, and the run's audit log is {result.audit_path}",
            PartialResultWarning,
            stacklevel=3,
        )

    def _inference_data(self, dl: Iterable[Any] | None, what: str) -> Iterable[Any]:
        data = self.dls.valid if dl is None else dl
        if not _is_data(data):
            msg = (
                f"{what}(dl): dl must be an iterable of batches (a DataLoader, a list) or None "
                f"for dls.valid; got {safe_text(type(data).__name__, 80)}"
            )
            raise InvalidDataLoadersError(msg)
        return data

    def _pass_metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for cb in self.cbs:
            if isinstance(cb, MetricsProvider):
                values.update((k, v) for k, v in cb.last_pass().items() if k != "loss")
        return values

    def _check_idle(self, what: str) -> None:
        if self.running or self._state is not State.IDLE:
            msg = (
                f"{what} called in state '{self._state}' while a {self._kind} run is in "
                f"progress; a run can only start from idle, once the previous one has "
                f"closed its log"
            )
            raise InvalidTransitionError(msg)

    def _execute(
        self, kind: RunKind, prepare: Callable[[], None], body: Callable[[], RunStatus]
    ) -> FitResult:
        """Run the machine as ``kind``: open the run, run ``body``, close the run."""
        try:
            self._prepare(kind)
            prepare()
            self._open_run()
            try:
                status = body()
                if self._agreeing:  # after the last hooks and cleanups: no rank fails alone
                    self._agree(AgreePoint.CLOSE)
                    self._agreeing = False
                return self._close_run(status)
            except BaseException as exc:
                failed = self._as_failure(exc)
                if self._agreeing:
                    self._agree_failure(failed)
                self._handle_failure(failed)
                if failed is exc:
                    # by name: on CPython 3.11 a bare raise can re-raise an exception some
                    # handler below caught, when a KeyboardInterrupt from a trace function
                    # cut that handler short (test_fault_injection, Ctrl-C seed 27)
                    raise exc  # noqa: TRY201 (see above)
                raise failed from exc
        except BaseException as exc:
            if self._agreeing and exc is not self._told:  # before the run opened, say
                self._agree_failure(exc)
            self._settle(exc)
            raise exc  # noqa: TRY201 (by name, as above)
        finally:
            if self._state is not State.IDLE:  # pragma: no cover (_settle saw to it)
                self._go_idle()
            hypers = self._hypers
            if kind is RunKind.FIT and hypers is not None and hypers.opt is self.opt:
                hypers.end_fit()

    def _train(self) -> RunStatus:
        passes = [
            (epoch, training) for epoch in range(self._n_epochs) for training in (True, False)
        ]
        first, skip = self._resume_start(passes)
        try:
            self._epoch = passes[first][0] if first < len(passes) else self._n_epochs
            self._fire(Trigger.BEGIN_FIT)
            if self._agreeing:
                self._agree(AgreePoint.BEGIN_FIT)
                self._wrap_model()
            if not skip:  # resuming between passes: back at the position already
                self._reenter()
            for index in range(first, len(passes)):
                epoch, training = passes[index]
                self._epoch = epoch
                data = self.dls.train if training else self.dls.valid
                if self._agreeing:
                    set_sampler_epoch(data, epoch)
                if self._one_pass(data, training=training, skip=skip) is _PassEnd.STOPPED:
                    return self._preempt()
                skip = 0
                after = passes[index + 1] if index + 1 < len(passes) else (self._n_epochs, True)
                if self._boundary_due and self._at_boundary(Position(State.FIT, *after)):
                    return self._preempt()
            self._fire(Trigger.END_FIT)
        except CancelFitException as exc:
            if self._agreeing:
                self._agree_cancel(exc)
            self._drop_unstepped_gradients()
            self._fire(Trigger.CANCEL_FIT)
            return RunStatus.CANCELLED
        return RunStatus.COMPLETED

    def _preempt(self) -> RunStatus:
        self._fire(Trigger.PREEMPT)
        return RunStatus.PREEMPTED

    def _resume_start(self, passes: list[tuple[int, bool]]) -> tuple[int, int]:
        """Return the index of the fit's first pass and the batches of it to skip."""
        checkpoint = self._resume
        if checkpoint is None:
            return 0, 0
        at = checkpoint.position
        index = passes.index((at.epoch, at.training)) if at.epoch < self._n_epochs else len(passes)
        return index, at.iter if at.state is State.EPOCH else 0

    def _infer(self, data: Iterable[Any], on_batch: Callable[[Learner], None]) -> RunStatus:
        try:
            ended = self._one_pass(data, training=False, on_batch=on_batch)
        except CancelFitException:
            self._drop_unstepped_gradients()
            self._fire(Trigger.CANCEL_FIT)
            return RunStatus.CANCELLED
        return RunStatus.COMPLETED if ended is _PassEnd.COMPLETED else RunStatus.CANCELLED

    def _prepare(self, kind: RunKind) -> None:
        self._unstepped = False
        self._resume = self._resumed_from = self._pass_start = None
        # an inference run is this process's alone; learn.world stays the last fit's
        self._agreeing = agreeing = kind is RunKind.FIT and self._world.distributed
        self._trail = [] if agreeing else None
        if agreeing:
            self._world.check = self._agree_collective
        self._proposal, self._agreed, self._told = Proposal.NONE, None, None
        self._resolve_callbacks(kind)
        self._checkpointers = _checkpointers(self._cbs) if kind is RunKind.FIT else ()
        self._epoch = self._iter = 0
        self._counts = _zero_counts()
        self._hook_ns = _zero_counts()
        if self._hook_times is not None:
            self._hook_times.reset()
        self._rank = self._world.rank if agreeing else _rank()
        self._failure = self._origin = None
        if agreeing:
            self._share_loaders()

    def _resolve_callbacks(self, kind: RunKind) -> None:
        """Check the callbacks and compile their dispatch, every run (they may have changed)."""
        self._cbs = validate_callbacks(self._cbs)
        dispatch = resolve_dispatch(self._cbs)
        agreeing = self._agreeing
        self._compile_routes(dispatch, kind, agreeing=agreeing)
        self._dispatch = self._profiled(dispatch)
        # together: the compiled routes always hold the modes of the kind
        self._compiled, self._kind = self._compiled_for, kind
        self._hook_times = None if self._compiled_times is None else self._compiled_times[0]
        self._agree_step = agreeing and bool(
            dispatch.hooks[Hook.AFTER_BACKWARD] or dispatch.overrides[Override.BACKWARD]
        )
        self._go_idle()  # the routes match the mode
        times = self._hook_times
        chains = work_chains(dispatch, times, None if times is None else positions_of(self._cbs))
        self._predict = chains[Override.PREDICT]
        self._compute_loss = chains[Override.COMPUTE_LOSS]
        self._backward = chains[Override.BACKWARD]
        self._step = chains[Override.STEP]

    # -- the run's audit log ----------------------------------------------------------

    def note(self, name: str, **fields: Any) -> None:
        """Add a note to the audit log (metrics at pass end, say); JSON values only.

        The run stamps it with the loop counters (epoch, batch index, pass). Checked the
        same way whether the log is on or off; only a run has a log to note in.
        """
        run = self._run
        if run is None or not run.active:
            msg = f"note({name!r}) outside a run: notes belong to a run (call it from a hook)"
            raise InvalidTransitionError(msg)
        run.note(name, fields, epoch=self._epoch, it=self._iter, training=self._training)

    def _open_run(self) -> None:
        """Start the run and open its log: a file that cannot be opened raises here, first."""
        self._pending = None
        self._run = run = Run()  # from here on, _settle closes it whatever happens
        world = self._world
        if self._agreeing:
            self._agree(AgreePoint.OPEN)  # every rank got this far: no fit failed to start
            run.run_id = world.agree_run_id(run.run_id)
        run.open(
            self._audit_log,
            key=self._audit_key,
            rank=self._rank,
            world_size=world.size,
            settings=self._settings,
        )
        run.start()
        self._pending = run.pending

    def _settings(self) -> dict[Field, Any]:
        """Return what the run's header says of this learner and this run."""
        params = list(self.model.parameters())
        fitting = self._kind is RunKind.FIT
        opt = self.opt if fitting else None
        return {
            Field.KIND: self._kind.value,
            Field.CALLBACKS: [[type(cb).__name__, cb.order] for cb in self.cbs],
            Field.MODEL: type(self.model).__name__,
            Field.OPTIMIZER: type(opt).__name__ if fitting else None,
            Field.PARAMS: sum(p.numel() for p in params),
            Field.N_EPOCHS: self._n_epochs if fitting else 0,
            Field.LR: self.lr if opt is None else json_setting(opt.param_groups[0]["lr"]),
            Field.OPT_GROUPS: None if opt is None else optimizer_groups(opt),
            Field.LOSS: callable_name(self.loss_func),
            Field.DEVICE: str(params[0].device) if params else "cpu",
            Field.TORCH: torch.__version__,
        } | ({} if self._resumed_from is None else {Field.RESUMED_FROM: self._resumed_from})

    def _compile_routes(self, dispatch: Dispatch, kind: RunKind, *, agreeing: bool) -> None:
        """Compile the run's routes, unless the same callbacks run the same functions (reuse).

        With ``profile_hooks``, each hook call is timed (``_timed``), and where each
        callback sits in ``learn.cbs`` is part of what the routes depend on.
        """
        positions = positions_of(self._cbs) if self._profile_hooks else None
        slots = None if positions is None else hook_slots(dispatch, positions)
        key = (kind, agreeing, slots, *_dispatch_key(dispatch))
        if key == self._compiled_key:
            return
        self._compiled_key = key
        self._compiled_times = None
        if positions is not None and slots is not None:
            times = HookTimes.of(slots)
            self._compiled_times = times, timed_hooks(dispatch.hooks, positions, times)
        self._compiled_for = _compile(self._profiled(dispatch), kind, agreeing=agreeing)

    def _profiled(self, dispatch: Dispatch) -> Dispatch:
        """Return ``dispatch`` with the compiled routes' timed hooks, when they profile them."""
        compiled = self._compiled_times
        return dispatch if compiled is None else Dispatch(compiled[1], dispatch.overrides)

    def _note_hook_times(self, _exc: BaseException | None = None) -> None:
        """Note the time per (callback, hook) since the last note: if any ran and the run is on."""
        times, run = self._hook_times, self._run
        if times is None or run is None or not run.active or run.footed:
            return
        for rows in note_rows(times.take()):
            run.note(
                "hook_times",
                {"hooks": rows},
                epoch=self._epoch,
                it=self._iter,
                training=self._training,
            )

    def _the_run(self) -> Run:
        run = self._run
        if run is None:  # pragma: no cover (a run is opened before any transition)
            msg = "no run: fit(), validate() and get_preds() open one before the first transition"
            raise InvalidTransitionError(msg)
        return run

    def _end_pass(self) -> None:
        if self._hook_times is not None:
            self._note_hook_times()
        self._the_run().end_pass(
            epoch=self._epoch,
            training=self._training,
            batches=self._counts[Trigger.END_BATCH, self._training],
        )

    def _close_run(self, status: RunStatus) -> FitResult:
        run = self._the_run()
        if self._hook_times is not None:
            self._note_hook_times()
        run.finish(status, self._hook_ns)
        self._pending = None
        self._last_result = FitResult(run.run_id, status, run.path, run.head)
        return self._last_result

    def _one_pass(
        self,
        data: Iterable[Any],
        *,
        training: bool,
        on_batch: Callable[[Learner], None] | None = None,
        skip: int = 0,
    ) -> _PassEnd:
        """Run one pass over ``data`` (from batch ``skip``, resuming); say how it ended."""
        self._training = training
        self._iter = skip
        self._node = self._compiled[self._kind, training][self._state]
        self.model.train(training)
        self.dl = data
        logged = self._pending is not None
        flush_if_due = self._the_run().flush_if_due  # looked up once a pass, not per batch
        ended = _PassEnd.COMPLETED
        try:
            with torch.set_grad_enabled(training):
                self._fire(Trigger.BEGIN_EPOCH)
                if self._agreeing:
                    self._agree(AgreePoint.BEGIN_EPOCH)
                for i, batch in self._batches(data, skip):
                    self._iter = i
                    self.batch = batch
                    if self._one_batch() and on_batch is not None:
                        on_batch(self)
                    if self._boundary_due and self._at_boundary(
                        Position(State.EPOCH, self._epoch, training, i + 1)
                    ):
                        return _PassEnd.STOPPED
                    if logged:
                        flush_if_due()
                self._fire(Trigger.END_EPOCH)
        except CancelEpochException as exc:
            if self._agreeing:
                self._agree_cancel(exc)
            self._drop_unstepped_gradients()
            self._fire(Trigger.CANCEL_EPOCH)
            ended = _PassEnd.CANCELLED
        self._end_pass()
        return ended

    def _batches(self, data: Iterable[Any], skip: int) -> Iterator[tuple[int, Any]]:
        """Iterate the pass's batches, numbered; resuming mid-pass, from batch ``skip``.

        With a checkpointing callback, the generators' states are kept first: a mid-pass
        checkpoint holds them, so that its resume draws the same order again.
        """
        checkpoint = self._resume
        if checkpoint is not None and skip:
            return enumerate(self._resumed_batches(checkpoint, data, skip), start=skip)
        if self._checkpointers:
            self._pass_start = {
                "rng": rng_state(),
                "generators": [g.get_state() for g in loader_generators(data)],
            }
        return enumerate(data)

    def _resumed_batches(
        self, checkpoint: Checkpoint, data: Iterable[Any], skip: int
    ) -> Iterator[Any]:
        """Start the pass again from batch ``skip``, its order drawn as it was; then re-enter."""
        start = checkpoint.payload["pass"] or {}
        self._pass_start = {"rng": start["rng"], "generators": start["generators"]}
        set_rng_state(start["rng"])
        for generator, state in zip(loader_generators(data), start["generators"], strict=False):
            generator.set_state(state)
        saved = (checkpoint.payload.get("loaders") or {}).get(
            "train" if self._training else "valid"
        )
        if saved is not None and saved.get("state") is not None and stateful(data):
            load_loader_state(data, saved["state"])
            iterator: Iterator[Any] = _started(iter(data))
        else:
            iterator, warning = skip_batches(data, skip)
            if warning is not None:
                warnings.warn(warning, ResumeWarning, stacklevel=7)
        self._reenter()
        return iterator

    def _one_batch(self) -> bool:
        """Run one batch; return False when it was cancelled."""
        fire = self._fire
        # nothing of the last batch's: work that sets nothing is caught, not reused
        self.output = self.preds = None
        self.loss = _NO_LOSS
        try:
            fire(Trigger.BEGIN_BATCH)
            if self._agreeing and self._training:  # DDP's forward is collective too
                self._agree(AgreePoint.FORWARD)
            self._predict(self)
            if self.preds is None:
                self._refuse_work(Override.PREDICT, "learn.preds")
            fire(Trigger.PREDICT)
            if self._kind is not RunKind.PREDICT:
                self._compute_loss(self)
                if self.loss is _NO_LOSS:
                    self._refuse_work(Override.COMPUTE_LOSS, "learn.loss")
                fire(Trigger.COMPUTE_LOSS)
                if self._training:
                    if self._agreeing:  # no rank skips a backward the others take
                        self._agree(AgreePoint.BACKWARD)
                    self._unstepped = True  # from here to the step, gradients are pending
                    self._backward(self)
                    fire(Trigger.BACKWARD)
                    if self._agree_step:  # a hook or override may cancel before the step
                        self._agree(AgreePoint.STEP)
                    self._step(self)
                    self._unstepped = False
                    fire(Trigger.STEP)
            fire(Trigger.END_BATCH)
        except CancelBatchException as exc:
            if self._agreeing:
                self._agree_cancel(exc)
            self._drop_unstepped_gradients()
            fire(Trigger.CANCEL_BATCH)
            return False
        return True

    # -- the one place where transitions happen ---------------------------------------

    def _fire(self, trigger: Trigger) -> None:
        route = self._node.get(trigger)
        if route is None:
            self._refuse(trigger)
        calls = route.calls
        if route.hooks_first:  # the end of a unit: once per batch
            self._end_unit(route)
        # the state change, inlined: this runs 5-6 times per batch
        # the record first: an interrupt before the state change leaves the log one step
        # ahead, and the failure path takes the log's state (see _fail_transition)
        pending = self._pending
        if pending is not None:
            pending.append((_now_ns(), route.record, self._epoch, self._iter))
        trail = self._trail
        if trail is not None:
            trail.append((route.code, self._epoch, self._iter))
        self._state = route.dest
        self._node = route.next
        self._counts[route.count_key] += 1
        if calls and not route.hooks_first:
            try:
                self._run_hooks(route)
            except BaseException as exc:
                if route.cleanups:  # the units it left are cleaned up whatever its hook raised
                    self._run_cleanups(route, exc)
                raise exc  # noqa: TRY201 (by name, as in _execute)
        if route.cleanups:
            self._run_cleanups(route)

    def _end_unit(self, route: _Route) -> None:
        """Run an ``end_*`` route's hooks; across ranks, then agree (before the change)."""
        if route.calls:
            self._run_hooks(route)
        if route.agree is not None:
            self._agree(route.agree)

    def _run_hooks(self, route: _Route) -> None:
        start = _now_ns()
        try:
            for cb, call in route.calls:
                try:
                    call(self)
                except CancelException as exc:
                    self._vet_cancel(exc, route.hook, cb)
                    if self._agreeing:  # a proposal: the next agreement decides
                        self._proposal = max(self._proposal, _proposal(exc))
                        continue
                    raise
                except BaseException as exc:
                    self._origin = Failure(exc, self._state, route.hook, cb)
                    raise
        finally:
            self._hook_ns[route.count_key] += _now_ns() - start

    def _run_cleanups(self, route: _Route, pending: BaseException | None = None) -> None:
        """Run every cleanup of the units ``route`` left; the first error is raised after all.

        ``pending`` is what the route's own hook raised: an error stays the first (the
        cleanups' errors become notes on it); a cancel gives way to a cleanup's error.
        """
        start = _now_ns()
        first = None if isinstance(pending, CancelException) else pending
        try:
            for hook, cb, call in route.cleanups:
                try:
                    call(self)
                except BaseException as exc:  # noqa: BLE001 (every cleanup runs; the first error wins)
                    first = self._cleanup_error(first, exc, hook, cb)
        finally:
            self._hook_ns[route.count_key] += _now_ns() - start
        if first is not None and first is not pending:
            raise first

    def _cleanup_error(
        self, first: BaseException | None, exc: BaseException, hook: Hook, cb: Callback
    ) -> BaseException:
        if isinstance(exc, CancelException):
            where = f"raised in cleanup hook {hook} of {type(cb).__name__}"
            illegal = IllegalCancelError(
                f"{type(exc).__name__} {where}: a cleanup hook runs after its unit ended "
                f"and cannot cancel; raise it in the unit's after_ hook instead"
            )
            illegal.__cause__ = exc
            exc = illegal
        if first is None:
            self._origin = Failure(exc, self._state, hook, cb)
            return exc
        add_note(
            first,
            f"fsm_learner: then {hook} of {safe_text(type(cb).__name__, 200)} raised "
            f"{exception_text(exc, 300)} (it ran anyway; the first error wins)",
        )
        return first

    def _drop_unstepped_gradients(self, _exc: BaseException | None = None) -> None:
        """Zero the gradients of a batch cancelled (or failed) between its backward and step.

        From the start of the backward work to the end of the step work: left in ``.grad``,
        they would add to the next batch's (or pass's, or fit's) step.
        """
        if self._unstepped:
            self._unstepped = False
            self.model.zero_grad(set_to_none=True)

    def _refuse_work(self, work: Override, attribute: str) -> NoReturn:
        overrides = self._dispatch.overrides[work]
        by = ", ".join(type(cb).__name__ for cb in overrides) or "no callback"
        msg = (
            f"the {work} work of batch {self._iter} set no {attribute}: its overrides ({by}) "
            f"must either call proceed() or set {attribute} themselves"
        )
        raise InvalidCallbackError(msg)

    def _refuse(self, trigger: Trigger) -> NoReturn:
        allowed = ", ".join(self._node) or "none"
        msg = (
            f"trigger '{trigger}' is not allowed in state '{self._state}' "
            f"({self._kind} run, training={self._training}); allowed there: {allowed}"
        )
        raise InvalidTransitionError(msg)

    def _vet_cancel(self, exc: CancelException, hook: Hook, cb: Callback) -> None:
        trigger = cancel_trigger(exc)
        if trigger is not None and trigger in self._node:
            return
        where = f"raised in hook {hook} of {type(cb).__name__} in state '{self._state}'"
        illegal = IllegalCancelError(_illegal_cancel_message(exc, trigger, where, self._node))
        self._origin = Failure(illegal, self._state, hook, cb)
        raise illegal from exc

    # -- across ranks ------------------------------------------------------------------

    def _share_loaders(self) -> None:
        """For the fit, make ``learn.dls`` each rank's share (what callbacks count too)."""
        dls, config = self._dls, self._distributed
        if config is None or not config.distribute_samplers:
            return
        shares = []
        for name, data in (("train", dls.train), ("valid", dls.valid)):
            share, warning = distributed_loader(data, self._world)
            if warning is not None:
                warnings.warn(f"dls.{name}: {warning}", DistributedWarning, stacklevel=6)
            shares.append(share)
        if shares != [dls.train, dls.valid]:
            self._user_dls, self._dls = dls, DataLoaders(shares[0], shares[1])

    def _wrap_model(self) -> None:
        """Train the model wrapped in DDP for this fit (after before_fit moved it)."""
        config = self._distributed
        if config is None or not config.wrap_model:
            return
        wrapped = wrap_model(self.model, self._world, config.ddp_options)
        if wrapped is not self.model:
            self._user_model, self.model = self.model, wrapped

    def _give_back(self) -> None:
        """Give ``learn.model`` and ``learn.dls`` back as they were given, once the fit is over."""
        model, self._user_model = self._user_model, None
        if model is not None:
            self.model = model
        dls, self._user_dls = self._user_dls, None
        if dls is not None:
            self._dls = dls

    def _agree_collective(self) -> None:
        """Agree before a callback's collective (``World.sum``): paths and failures only."""
        self._agree(AgreePoint.COLLECTIVE)

    def _agree(self, point: AgreePoint) -> None:
        """Agree with every rank at ``point``; raise the cancel or the failure agreed on.

        Before a callback's collective, a proposal waits for the next point of the loop.
        """
        trail = self._trail if self._trail is not None else []
        collective = point is AgreePoint.COLLECTIVE
        proposal = Proposal.NONE
        if point is not AgreePoint.CLOSE and not collective:  # at close: failures only
            proposal, self._proposal = self._proposal, Proposal.NONE
        mark = hash((_POINTS.index(point), self._epoch, self._iter, self._training, *trail))
        agreement = self._world.agree(
            proposal, mark, boundary=self._stop_asked, collective=collective
        )
        self._decide(agreement, point)
        trail.clear()
        if agreement.proposal is not Proposal.NONE:
            self._take(agreement, point)

    def _decide(self, agreement: Agreement, point: AgreePoint) -> None:
        """Act on what every rank sees alike: a stop asked, a failure, ranks that parted."""
        if agreement.boundary and self._checkpointers:
            self._preempt_wanted = self._boundary_due = True
        if agreement.proposal is Proposal.FAIL:
            raise self._world.failed_elsewhere(agreement, point)
        if agreement.parted:
            raise self._divergence(point, agreement)

    def _take(self, agreement: Agreement, point: AgreePoint) -> NoReturn:
        """Raise the cancel the ranks agreed on: every rank takes it here."""
        self._note_agreed(agreement.proposal, agreement.rank, point)
        cancel = _CANCEL_OF[agreement.proposal](
            f"rank {agreement.rank} proposed it; every rank takes it at the {point} agreement"
        )
        self._agreed = cancel
        raise cancel

    def _agree_cancel(self, exc: CancelException) -> None:
        """Agree on a cancel raised outside a hook (the batch's work), where it was raised.

        A cancel the ranks agreed on (raised by ``_take``) needs no second agreement.
        """
        if exc is self._agreed:
            return
        own = _proposal(exc)
        proposal, self._proposal = max(self._proposal, own), Proposal.NONE
        # paths differ inside a cancelled unit: the mark says nothing here; in the step work,
        # the ranks that did not cancel stepped (which only every rank cancelling there undoes)
        in_step = self._state is State.BACKWARD
        agreement = self._world.agree(
            proposal, 0, boundary=self._stop_asked, escaped=True, in_step=in_step
        )
        self._decide(agreement, AgreePoint.CANCEL)
        if self._trail is not None:
            self._trail.clear()
        if agreement.proposal is not own:
            self._take(agreement, AgreePoint.CANCEL)
        self._note_agreed(own, agreement.rank, AgreePoint.CANCEL)
        self._agreed = exc

    def _agree_failure(self, exc: BaseException) -> None:
        """Tell every rank this one fails (or note the failure of another): guarded.

        A failing rank proposes ``fail`` at once; the others take it at their next
        agreement, told its exception. A ``DistributedError`` was agreed already, or
        the ranks can no longer agree.
        """
        world, self._told = self._world, exc
        try:
            if isinstance(exc, RankFailedError):
                self._note_agreed(Proposal.FAIL, exc.rank, AgreePoint(exc.at), exc.error)
                return
            if isinstance(exc, DistributedError) or world.broken:
                return  # agreed already, or the ranks can no longer agree
            agreement = world.agree(Proposal.FAIL, 0)
            text = world.broadcast_text(self._failure_text(exc), agreement.rank)
            if agreement.rank != world.rank:
                add_note(exc, f"fsm_learner: rank {agreement.rank} failed too: {text}")
            self._note_agreed(Proposal.FAIL, agreement.rank, AgreePoint.FAILURE, text)
        except BaseException as later:  # noqa: BLE001 (the first failure must win)
            add_note(
                exc,
                f"fsm_learner: then {exception_text(later, 300)} telling the other ranks "
                f"(ignored: they fail at their timeout)",
            )

    def _failure_text(self, exc: BaseException) -> str:
        origin = self._origin
        where = (
            origin.describe()
            if origin is not None and origin.exception is exc
            else f"in state '{self._state}'"
        )
        return f"{exception_text(exc, 1500)} ({where})"

    def _note_agreed(
        self, proposal: Proposal, rank: int, point: AgreePoint, error: str | None = None
    ) -> None:
        """Write the ``agreed`` note: what every rank takes, who proposed it, where."""
        run = self._run
        if run is None or not run.active:
            return
        fields: dict[str, Any] = {"cancel": proposal.name.lower(), "rank": rank, "at": str(point)}
        if error is not None:
            fields["error"] = error[:2000]
        run.note("agreed", fields, epoch=self._epoch, it=self._iter, training=self._training)

    def _divergence(self, point: AgreePoint, agreement: Agreement) -> DivergenceError:
        """Name the first transition where the ranks' paths part (every rank says the same)."""
        trail = self._trail if self._trail is not None else []
        named = [(_TRIGGERS[code // 2].value, ep, it, bool(code % 2)) for code, ep, it in trail]
        named.append((f"@{point}", self._epoch, self._iter, self._training))
        trails = self._world.gather(named)
        why = (
            "a cancel raised in the step work of some ranks only (the others stepped: their "
            "weights differ; cancel in after_backward, where the ranks agree before the step); "
            if agreement.stepped_apart
            else ""
        )
        return DivergenceError(f"the ranks' paths diverged: {why}{first_difference(trails)}")

    # -- the failure path ------------------------------------------------------------

    def _as_failure(self, exc: BaseException) -> BaseException:
        """Turn a cancel that escaped its unit outside any hook into an IllegalCancelError."""
        if not isinstance(exc, CancelException):
            return exc
        where = f"raised outside a hook in state '{self._state}'"
        return IllegalCancelError(_illegal_cancel_message(exc, cancel_trigger(exc), where))

    def _handle_failure(self, exc: BaseException) -> None:
        """Take the fail transition, run after_fail and the cleanups, close the log: each guarded.

        Whatever a step raises (a hook, the disk, a second Ctrl-C) becomes a note on
        ``exc`` and the next step still runs: the first failure wins.
        """
        steps = (
            ("recording it", self._record_failure),
            ("the fail transition", self._fail_step),
            ("dropping the batch's gradients", self._drop_unstepped_gradients),
            (f"{Hook.AFTER_FAIL}", self._run_fail_hooks),
            ("noting the hook times", self._note_hook_times),
            ("closing the audit log", self._log_failure),
        )
        for what, step in steps:
            try:
                step(exc)
            except BaseException as later:  # noqa: BLE001 (the first failure must win)
                add_note(
                    exc,
                    f"fsm_learner: then {exception_text(later, 200)} while {what} "
                    "(ignored: the first failure wins)",
                )

    def _record_failure(self, exc: BaseException) -> None:
        origin = self._origin
        failure = origin if origin is not None and origin.exception is exc else None
        self._failure = failure or Failure(exc, self._state)
        add_note(exc, f"fsm_learner: {type(exc).__name__} {self._failure.describe()}")

    def _fail_transition(self) -> None:
        """Fire ``fail`` from the log's state; the learner ends idle.

        After an interrupt inside ``_fire`` the log may be one step ahead of the
        learner: firing from the log's state keeps the log replayable.
        """
        run = self._run
        if run is not None:
            run.settle()
        if run is not None and run.footed:  # the run ended before the failure
            self._go_idle()
            return
        state = self._state if run is None else run.log_state(self._state)
        self._fail_source = state
        self._state, self._node = state, self._compiled[self._kind, self._training][state]
        self._fire(Trigger.FAIL)  # its route runs no hook: after_fail runs guarded, next

    def _fail_step(self, _exc: BaseException) -> None:
        self._fail_source = self._state
        self._fail_transition()

    def _run_fail_hooks(self, exc: BaseException) -> None:
        """Run after_fail, then the cleanups of the units the failure left: each guarded."""
        hooks = self._dispatch.hooks
        calls = [(Hook.AFTER_FAIL, cb, call) for cb, call in hooks[Hook.AFTER_FAIL]]
        calls += [
            (hook, cb, call)
            for hook in cleanup_hooks(self._fail_source, State.IDLE, self._kind)
            for cb, call in hooks[hook]
        ]
        start = _now_ns()
        try:
            for hook, cb, call in calls:
                try:
                    call(self)
                except BaseException as hook_exc:  # noqa: BLE001 (the first failure must win)
                    add_note(
                        exc,
                        f"fsm_learner: then {hook} of {safe_text(type(cb).__name__, 200)} "
                        f"raised {exception_text(hook_exc, 300)} (ignored)",
                    )
        finally:  # the footer gives it to the fail transition's hooks
            self._hook_ns[Trigger.FAIL, self._training] += _now_ns() - start

    def _log_failure(self, exc: BaseException) -> None:
        detail = (self._failure or Failure(exc, self._state)).detail()
        run = self._run
        if run is not None:
            run.fail(detail, self._hook_ns, self._fail_transition)
            self._last_result = FitResult(run.run_id, RunStatus.FAILED, run.path, run.head)
            if run.head is not None:
                add_note(exc, f"fsm_learner: audit log {run.path}")
        self._pending = None

    def _go_idle(self) -> None:
        self._state, self._training = State.IDLE, False
        self._node = self._compiled[self._kind, False][State.IDLE]

    def _settle(self, current: BaseException) -> None:
        """Whatever ended the run, leave the learner idle and the log closed.

        After a failure that was handled, this finds nothing to do. It acts when an
        exception cut the failure handling short: the log gets what it lacks of its
        records, a fail record and a footer; what cannot be written is
        noted on ``current``, and a block whose write was cut short is cut off the file.
        """
        run = self._run
        try:
            self._note_hook_times()
        except BaseException as exc:  # noqa: BLE001 (an exception is already on its way out)
            add_note(current, f"fsm_learner: then {exception_text(exc, 200)} noting the hook times")
        try:
            if run is not None and not run.closed:
                self._pending = run.pending
                failure = self._failure or Failure(current, self._state)
                run.fail(failure.detail(), self._hook_ns, self._fail_transition)
        except BaseException as exc:  # noqa: BLE001 (an exception is already on its way out)
            add_note(current, f"fsm_learner: then {exception_text(exc, 200)} closing the log")
        finally:
            self._pending = None
            if run is not None:
                run.abandon()  # closes; cuts off only a write that never committed
            self._go_idle()


_Built = tuple[torch.optim.Optimizer, Callable[..., Any], Callable[..., Any], frozenset[int]]
"""An optimizer the learner built, with its opt_func, param_groups and parameters' ids."""


def _opt_ids(opt: torch.optim.Optimizer) -> frozenset[int]:
    return held_ids(opt.param_groups)


def _dispatch_key(dispatch: Dispatch) -> tuple[object, ...]:
    """Return what compiled routes depend on: each hook's callbacks and functions, in order.

    Callbacks are compared by identity (``id``); the key holds them too, so that no id in
    it can be another object's while it is kept.
    """
    calls = [(cb, call) for hook_calls in dispatch.hooks.values() for cb, call in hook_calls]
    return (
        *(len(hook_calls) for hook_calls in dispatch.hooks.values()),
        *((id(cb), getattr(call, "__func__", call)) for cb, call in calls),
        tuple(cb for cb, _ in calls),
    )


_ENTRY_POINT: Final = MappingProxyType(
    {RunKind.VALIDATE: "validate", RunKind.PREDICT: "get_preds"},
)
"""The method that starts each kind of inference run, for messages."""


def _nothing() -> None:
    """Prepare nothing more: an inference run builds no optimizer."""


def _all_parameters(model: nn.Module) -> Iterable[Any]:
    return model.parameters()


def _check_callable(name: str, func: object, *, optional: bool = False) -> None:
    if callable(func) or (optional and func is None):
        return
    also = " or None" if optional else ""
    hint = ""
    if isinstance(func, torch.optim.Optimizer):
        hint = (
            ": an optimizer already built; pass its class (torch.optim.Adam) or a "
            "functools.partial of it, or set learn.opt to the optimizer itself"
        )
    msg = f"{name} must be callable{also}, got {_shown(func)}{hint}"
    raise ConfigurationError(msg)


def _illegal_cancel_message(
    exc: CancelException,
    trigger: Trigger | None,
    where: str,
    allowed: Iterable[Trigger] = (),
) -> str:
    name = type(exc).__name__
    if trigger is None:
        return f"{name} {where} is not a cancel the machine knows; raise one of {cancel_names()}"
    allowed_there = ", ".join(allowed)
    tail = f"; allowed there: {allowed_there}" if allowed_there else ""
    return f"{name} {where}, where {trigger} is not allowed{tail}"
