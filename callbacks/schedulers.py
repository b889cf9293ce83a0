"""BatchSchedCB and EpochSchedCB: ``torch.optim.lr_scheduler`` schedulers driven by the loop.

This module owns building a scheduler for each fit and stepping it. Each fit gets a new
schedule from its start, built in ``before_fit`` on the learner's optimizer (which
persists across fits) from a factory: ``sched_func(opt)``, or
``with_total_steps(opt, total_steps)`` for schedules that need their length (OneCycleLR's
``total_steps``, CosineAnnealingLR's ``T_max``), which is computed from
``learn.n_epochs`` and, per optimizer step, ``len(learn.dls.train)`` and the callbacks that
step less often than once a batch (``OptimizerStepCounter``: GradientAccumulationCB). A
factory that fails, or returns something other than an ``LRScheduler``, is reported as a
``ConfigurationError`` naming the factory and what would work.

A schedule of known length (``with_total_steps``) is never stepped past its end: the
optimizer ends the fit at the schedule's final rate (one-cycle's ``initial_lr /
final_div_factor``), as the last step used it. When the fit ends, by any route
(``cleanup_fit``), the keys the scheduler added to the param groups (``initial_lr``,
``max_lr``, ...) are removed, so that the next fit's scheduler starts from the optimizer's
rate then; ``lr`` and ``momentum`` stay where the schedule left them, as torch leaves
them (set ``learn.lr`` to train on at another rate). ``scheduler`` keeps the last fit's
scheduler for inspection. Neither callback syncs.

Checkpoints. A schedule belongs to its fit, so ``state_dict()`` holds one only while a
fit runs (between ``before_fit`` and ``cleanup_fit``; all None at idle): the scheduler's
``state_dict()`` and class name (checked on load), ``total_steps``, the hyperparameters
of each param group now (the rate and momentum the schedule set, and the keys it added)
and as the fit found them (what ``cleanup_fit`` goes back to). Loaded after
``before_fit`` (a resumed fit), it puts the scheduler at the step it was, the param
groups' hyperparameters as they were (building the new scheduler reset the rate), and
the fit's starting settings, so the schedule continues at the same rates and the fit
ends as the uninterrupted one. Loaded at idle, there is no schedule to continue: the
next fit builds its own, as it would have, and the state is ignored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sized
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, cast, runtime_checkable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR, ReduceLROnPlateau

from callbacks._checks import check_number
from callbacks._state import state_keys, state_list, state_optional, state_value
from fsm_learner import Callback, ConfigurationError
from fsm_learner.exceptions import CheckpointError
from fsm_learner.machine import RunKind

_STEP_ORDER_WARNING: Final = (
    r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"
)
"""torch's warning when a scheduler steps before the optimizer has, in this process."""

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner
    from fsm_learner.callback import Proceed

__all__ = [
    "BatchSchedCB",
    "EpochSchedCB",
    "OptimizerStepCounter",
    "SchedulerFactory",
    "TotalStepsSchedulerFactory",
]

SchedulerFactory = Callable[[Optimizer], LRScheduler]
"""Called as ``sched_func(opt)`` with the fit's optimizer."""
TotalStepsSchedulerFactory = Callable[[Optimizer, int], LRScheduler]
"""Called as ``with_total_steps(opt, total_steps)``: the steps the fit will take."""

_STEP_WORDS = ("total_steps", "steps_per_epoch", "T_max", "total_iters")


@runtime_checkable
class OptimizerStepCounter(Protocol):
    """A callback that lets the optimizer step less often than once per training batch."""

    def optimizer_steps(self, n_batches: int) -> int:
        """How many optimizer steps a training pass of ``n_batches`` batches takes."""
        ...  # pragma: no cover (protocol)


_GroupSettings = list[dict[str, Any]]
"""Each param group's hyperparameters (all but its params), as a fit found them."""
_STATE_KEYS: Final = ("scheduler", "scheduler_type", "total_steps", "param_groups", "fit_settings")


def _settings(opt: Optimizer) -> _GroupSettings:
    return [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]


def _remove_added_keys(opt: Optimizer, saved: _GroupSettings) -> None:
    """Remove the keys a scheduler added to ``opt``'s param groups (see the module doc)."""
    for group, before in zip(opt.param_groups, saved, strict=False):
        for key in [k for k in group if k != "params" and k not in before]:
            del group[key]


def _describe(func: object) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


class _OneCycle:
    """The factory ``BatchSchedCB.one_cycle`` uses: OneCycleLR over the fit's steps."""

    def __init__(self, max_lr: float, kwargs: dict[str, Any]) -> None:
        self.max_lr, self.kwargs = max_lr, kwargs

    def __call__(self, opt: Optimizer, total_steps: int) -> LRScheduler:
        return OneCycleLR(opt, self.max_lr, total_steps=total_steps, **self.kwargs)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"OneCycleLR(max_lr={self.max_lr!r}, total_steps=<the fit's optimizer steps>{extra})"


class _SchedulerCB(Callback):
    """What both scheduler callbacks share: the factory, and building the scheduler."""

    _unit: ClassVar[str] = "step"
    """What the scheduler counts, for messages."""
    _length_hint: ClassVar[str] = ""
    """How else to give a schedule its length, for messages."""

    def __init__(
        self,
        sched_func: SchedulerFactory | None = None,
        *,
        with_total_steps: TotalStepsSchedulerFactory | None = None,
    ) -> None:
        """Take exactly one factory: ``sched_func(opt)`` or ``with_total_steps(opt, n)``."""
        given = [f for f in (sched_func, with_total_steps) if f is not None]
        if len(given) != 1:
            msg = (
                f"{type(self).__name__}: give exactly one of sched_func(opt) and "
                f"with_total_steps(opt, total_steps), got {len(given)}"
            )
            raise ConfigurationError(msg)
        if not callable(given[0]):
            msg = (
                f"{type(self).__name__}: the scheduler factory must be callable "
                f"(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1), say), got {given[0]!r}"
            )
            raise ConfigurationError(msg)
        self.sched_func = sched_func
        self.with_total_steps = with_total_steps
        self.scheduler: LRScheduler | None = None
        """The current (or last) fit's scheduler."""
        self._resumed = False
        """Whether the schedule was just loaded from a checkpoint (not stepped since)."""
        self._saved: tuple[Optimizer, _GroupSettings] | None = None
        self.total_steps: int | None = None
        """The current (or last) fit's schedule length, when ``with_total_steps`` built it."""

    def _total_steps(self, learn: Learner) -> int:
        """How many times the scheduler will step in this fit."""
        raise NotImplementedError

    def before_fit(self, learn: Learner) -> None:
        """Build this fit's scheduler on the optimizer, keeping what it will change."""
        self.scheduler = None  # not the last fit's, should building this one fail
        self.total_steps = None
        opt = learn.opt
        if opt is None:  # pragma: no cover (fit builds the optimizer before before_fit)
            msg = f"{type(self).__name__}: no optimizer; fit() builds it before before_fit"
            raise ConfigurationError(msg)
        self._saved = (opt, _settings(opt))
        self.scheduler = self._build(learn, opt)

    def cleanup_fit(self, learn: Learner) -> None:
        """Remove the keys the scheduler added to the param groups, whatever the fit's end."""
        saved, self._saved = self._saved, None
        if saved is not None:
            _remove_added_keys(*saved)

    def state_dict(self) -> dict[str, Any]:
        """Return the running fit's schedule and param-group settings; all None at idle."""
        saved, scheduler = self._saved, self.scheduler
        if saved is None or scheduler is None:
            return dict.fromkeys(_STATE_KEYS)
        opt, fit_settings = saved
        return {
            "scheduler": scheduler.state_dict(),
            "scheduler_type": type(scheduler).__name__,
            "total_steps": self.total_steps,
            "param_groups": _settings(opt),
            "fit_settings": fit_settings,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved schedule in the running fit (ignored at idle: module doc)."""
        owner = type(self).__name__
        state = state_keys(owner, state, _STATE_KEYS)
        saved, scheduler = self._saved, self.scheduler
        if state["scheduler"] is None or saved is None or scheduler is None:
            return
        opt = saved[0]
        sched_state = state_value(owner, state, "scheduler", dict, "a dict (a scheduler's state)")
        total = state_optional(owner, state, "total_steps", int, "an int (the schedule's length)")
        groups = self._groups(state, "param_groups", len(opt.param_groups))
        fit_settings = self._groups(state, "fit_settings", len(opt.param_groups))
        if state["scheduler_type"] != type(scheduler).__name__:
            msg = (
                f"{owner}: the checkpoint holds a {state['scheduler_type']!r} schedule, this "
                f"fit built a {type(scheduler).__name__!r}: resume with the same scheduler"
            )
            raise CheckpointError(msg)
        scheduler.load_state_dict(sched_state)
        for group, settings in zip(opt.param_groups, groups, strict=True):
            group.update(settings)
        self.total_steps, self._saved = total, (opt, fit_settings)
        self._resumed = True

    def _step_scheduler(self, scheduler: LRScheduler) -> None:
        """Step the scheduler (quietly about step order the first time after a resume).

        The first step after a resume may precede this process's first optimizer step (the
        checkpoint was taken at a pass end): torch would warn, wrongly.
        """
        if not self._resumed:
            scheduler.step()
            return
        self._resumed = False
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_STEP_ORDER_WARNING, category=UserWarning)
            scheduler.step()

    def _groups(self, state: Mapping[str, Any], key: str, n_groups: int) -> _GroupSettings:
        owner = type(self).__name__
        groups = state_list(owner, state, key, dict, "dicts (one per param group)")
        if len(groups) != n_groups or any("params" in group for group in groups):
            msg = (
                f"{owner}: state[{key!r}] must hold the settings of {n_groups} param groups "
                f"(the optimizer's), without params; got {len(groups)} group(s)"
            )
            raise CheckpointError(msg)
        return groups

    def _build(self, learn: Learner, opt: Optimizer) -> LRScheduler:
        make: Callable[[], object]
        if self.with_total_steps is not None:
            # at least 1, so that a fit of 0 epochs does not fail building its schedule
            self.total_steps = max(1, self._total_steps(learn))
            make = partial(self.with_total_steps, opt, self.total_steps)
        else:
            make = partial(cast("SchedulerFactory", self.sched_func), opt)
        factory = _describe(self.sched_func or self.with_total_steps)
        try:
            scheduler = make()
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(self._factory_error(factory, exc)) from exc
        return self._check_scheduler(factory, scheduler)

    def _factory_error(self, factory: str, exc: Exception) -> str:
        text = str(exc)
        msg = (
            f"{type(self).__name__}: the scheduler factory {factory} raised "
            f"{type(exc).__name__}: {text}"
        )
        if any(word in text for word in (*_STEP_WORDS, "epochs")):
            msg += (
                f"; a scheduler that needs its length gets it from with_total_steps=lambda opt, "
                f"n: ... (n: the {self._unit}s of the fit){self._length_hint}"
            )
        return msg

    def _check_scheduler(self, factory: str, scheduler: object) -> LRScheduler:
        if isinstance(scheduler, ReduceLROnPlateau):
            msg = (
                f"{type(self).__name__}: {factory} built a ReduceLROnPlateau, which steps on a "
                f"metric; {type(self).__name__} steps schedulers without one: use a scheduler "
                f"of torch.optim.lr_scheduler that follows a schedule (StepLR, OneCycleLR, ...)"
            )
            raise ConfigurationError(msg)
        if not isinstance(scheduler, LRScheduler):
            msg = (
                f"{type(self).__name__}: the scheduler factory {factory} must return a "
                f"torch.optim.lr_scheduler.LRScheduler, got {scheduler!r} of type "
                f"{type(scheduler).__name__}"
            )
            raise ConfigurationError(msg)
        return scheduler

    def __repr__(self) -> str:
        """Name the factory besides the class and the order."""
        factory = _describe(self.sched_func or self.with_total_steps)
        return f"{type(self).__name__}({factory}, order={self.order})"


class BatchSchedCB(_SchedulerCB):
    """Step a scheduler once per optimizer step (OneCycleLR, say).

    ``BatchSchedCB(lambda opt: OneCycleLR(opt, 0.1, total_steps=300))``, or let the fit
    count the steps: ``BatchSchedCB(with_total_steps=lambda opt, n: ...)`` gets ``n``, the
    optimizer steps of the fit: ``n_epochs * len(dls.train)``, or with
    ``GradientAccumulationCB(k)`` ``n_epochs * ceil(len(dls.train) / k)``;
    ``BatchSchedCB.one_cycle(max_lr)`` builds a OneCycleLR that way, which then ends the
    fit's last step at its final rate. The scheduler steps in a ``step`` override, right
    after the optimizer: when a callback of lower order (gradient accumulation) skips the
    optimizer step, or one of higher order cancels it (a GradScaler's skipped step), the
    scheduler does not step either. Order 10.
    """

    order = 10
    _unit = "optimizer step"
    _length_hint = ", or BatchSchedCB.one_cycle(max_lr) for OneCycleLR"

    @classmethod
    def one_cycle(cls, max_lr: float, **kwargs: Any) -> BatchSchedCB:
        """Return a BatchSchedCB of ``OneCycleLR(opt, max_lr, total_steps=..., **kwargs)``."""
        return cls(with_total_steps=_OneCycle(check_number("max_lr", max_lr, strict=True), kwargs))

    def _total_steps(self, learn: Learner) -> int:
        train = learn.dls.train
        if not isinstance(train, Sized):
            msg = (
                f"BatchSchedCB: the schedule's total steps are n_epochs times the optimizer "
                f"steps of a pass over dls.train, but dls.train ({type(train).__name__}) has "
                f"no len(); give a DataLoader or a list, or pass sched_func=lambda opt: ... "
                f"with the total steps yourself"
            )
            raise ConfigurationError(msg)
        steps = len(train)
        for cb in learn.cbs:
            if isinstance(cb, OptimizerStepCounter):
                steps = cb.optimizer_steps(steps)
        return learn.n_epochs * steps

    def step(self, learn: Learner, proceed: Proceed) -> None:
        """Let the optimizer step (the rest of the chain), then step the scheduler."""
        proceed()
        scheduler, total = self.scheduler, self.total_steps
        # a schedule of known length stays at its last step: the rate the fit ends at
        if scheduler is not None and (total is None or scheduler.last_epoch < total - 1):
            self._step_scheduler(scheduler)


class EpochSchedCB(_SchedulerCB):
    """Step a scheduler at the end of each training pass, completed or cancelled (StepLR, say).

    ``EpochSchedCB(lambda opt: StepLR(opt, step_size=2))``, or
    ``EpochSchedCB(with_total_steps=lambda opt, n: CosineAnnealingLR(opt, T_max=n))`` with
    ``n = n_epochs``. Order 10.
    """

    order = 10
    _unit = "epoch"

    def _total_steps(self, learn: Learner) -> int:
        return learn.n_epochs

    def cleanup_epoch(self, learn: Learner) -> None:
        """Step the scheduler when a training pass ends, completed or cancelled.

        Not after a failure: the fit is over, and ``cleanup_fit`` puts the rate back.
        """
        stepping = learn.kind is RunKind.FIT and learn.training and learn.failure is None
        if stepping and self.scheduler is not None:
            self._step_scheduler(self.scheduler)
