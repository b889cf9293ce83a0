"""BatchSchedCB and EpochSchedCB: ``torch.optim.lr_scheduler`` schedulers driven by the loop.

This module owns building a scheduler for each fit and stepping it. ``fit`` builds a new
optimizer every time, so the scheduler is built in ``before_fit`` from a factory:
``sched_func(opt)``, or ``with_total_steps(opt, total_steps)`` for schedules that need
their length (OneCycleLR's ``total_steps``, CosineAnnealingLR's ``T_max``), which is
computed from ``learn.n_epochs`` and, per batch, ``len(learn.dls.train)``. A factory that
fails, or returns something other than an ``LRScheduler``, is reported as a
``ConfigurationError`` naming the factory and what would work. Neither callback syncs.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, cast

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR, ReduceLROnPlateau

from fsm_learner import Callback, ConfigurationError

if TYPE_CHECKING:
    from fsm_learner import Learner
    from fsm_learner.callback import Proceed

__all__ = ["BatchSchedCB", "EpochSchedCB", "SchedulerFactory", "TotalStepsSchedulerFactory"]

SchedulerFactory = Callable[[Optimizer], LRScheduler]
"""Called as ``sched_func(opt)`` with the fit's optimizer."""
TotalStepsSchedulerFactory = Callable[[Optimizer, int], LRScheduler]
"""Called as ``with_total_steps(opt, total_steps)``: the steps the fit will take."""

_STEP_WORDS = ("total_steps", "steps_per_epoch", "T_max", "total_iters")


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
        return f"OneCycleLR(max_lr={self.max_lr!r}, total_steps=n_epochs * len(dls.train){extra})"


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

    def _total_steps(self, learn: Learner) -> int:
        """How many times the scheduler will step in this fit."""
        raise NotImplementedError

    def before_fit(self, learn: Learner) -> None:
        """Build this fit's scheduler on this fit's optimizer."""
        self.scheduler = None  # not the last fit's, should building this one fail
        self.scheduler = self._build(learn)

    def _build(self, learn: Learner) -> LRScheduler:
        opt = learn.opt
        if opt is None:  # pragma: no cover (fit builds the optimizer before before_fit)
            msg = f"{type(self).__name__}: no optimizer; fit() builds it before before_fit"
            raise ConfigurationError(msg)
        make: Callable[[], object]
        if self.with_total_steps is not None:
            # at least 1, so that a fit of 0 epochs does not fail building its schedule
            make = partial(self.with_total_steps, opt, max(1, self._total_steps(learn)))
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
    """Step a scheduler once per optimizer step of each training batch (OneCycleLR, say).

    ``BatchSchedCB(lambda opt: OneCycleLR(opt, 0.1, total_steps=300))``, or let the fit
    count the steps: ``BatchSchedCB(with_total_steps=lambda opt, n: ...)`` gets
    ``n = n_epochs * len(dls.train)``, and ``BatchSchedCB.one_cycle(max_lr)`` builds a
    OneCycleLR that way. The scheduler steps in a ``step`` override, right after the
    optimizer: when a callback of lower order (gradient accumulation) skips the optimizer
    step, the scheduler does not step either. Order 10.
    """

    order = 10
    _unit = "training batch"
    _length_hint = ", or BatchSchedCB.one_cycle(max_lr) for OneCycleLR"

    @classmethod
    def one_cycle(cls, max_lr: float, **kwargs: Any) -> BatchSchedCB:
        """Return a BatchSchedCB of ``OneCycleLR(opt, max_lr, total_steps=..., **kwargs)``."""
        if isinstance(max_lr, bool) or not isinstance(max_lr, int | float) or max_lr <= 0:
            msg = f"BatchSchedCB.one_cycle: max_lr must be a number > 0, got {max_lr!r}"
            raise ConfigurationError(msg)
        return cls(with_total_steps=_OneCycle(max_lr, kwargs))

    def _total_steps(self, learn: Learner) -> int:
        train = learn.dls.train
        if not isinstance(train, Sized):
            msg = (
                f"BatchSchedCB: the schedule's total steps are n_epochs * len(dls.train), but "
                f"dls.train ({type(train).__name__}) has no len(); give a DataLoader or a list, "
                f"or pass sched_func=lambda opt: ... with the total steps yourself"
            )
            raise ConfigurationError(msg)
        return learn.n_epochs * len(train)

    def step(self, learn: Learner, proceed: Proceed) -> None:  # noqa: ARG002 (the override's signature)
        """Let the optimizer step (the rest of the chain), then step the scheduler."""
        proceed()
        if self.scheduler is not None:
            self.scheduler.step()


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

    def after_epoch(self, learn: Learner) -> None:
        """Step the scheduler when a training pass ends."""
        self._step_after_training(learn)

    def after_cancel_epoch(self, learn: Learner) -> None:
        """Step as well when a training pass is cancelled: the epoch's training ended."""
        self._step_after_training(learn)

    def _step_after_training(self, learn: Learner) -> None:
        if learn.training and self.scheduler is not None:
            self.scheduler.step()
