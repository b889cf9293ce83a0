"""The Callback base class, callback validation, and per-fit dispatch resolution.

A callback overrides the hooks it needs; the hook names are the ``Hook`` values of the
transition table. Besides hooks, callbacks may override the four pieces of work of a
batch: ``predict`` (default: call the model on the batch's inputs, set ``learn.output``
and ``learn.preds``), ``compute_loss`` (default: ``loss_func(preds, target)``, or the
loss the model computed), ``backward`` (default ``learn.loss.backward()``) and ``step``
(default ``learn.opt.step(); learn.opt.zero_grad()``), which is where autocast, gradient
accumulation, mixed precision and custom optimisation plug in. Overrides compose like middleware: in
ascending ``order``, each gets a ``proceed`` callable that runs the next override (or
the default); one that does not call it replaces what comes after. Gradient accumulation
(order lower) decides *whether* to step, mixed precision (order higher) *how*.

Dispatch is resolved once per run: for every hook, the bound methods of the callbacks
that implement it, in ascending ``order`` (ties in list order). The hot loop iterates
those ready tuples; a callback that does not implement a hook costs nothing for it.
"""

from __future__ import annotations

import difflib
import inspect
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import attrs

from fsm_learner._compat import StrEnum
from fsm_learner._display import safe_text
from fsm_learner.exceptions import InvalidCallbackError
from fsm_learner.machine import Hook

if TYPE_CHECKING:
    from fsm_learner.learner import Learner

__all__ = [
    "Callback",
    "Dispatch",
    "HookCall",
    "MetricsProvider",
    "Override",
    "OverrideCall",
    "Proceed",
    "chain_overrides",
    "resolve_dispatch",
    "validate_callbacks",
]

HookCall = Callable[["Learner"], None]
"""A bound hook: takes the learner, returns nothing."""
Proceed = Callable[[], None]
"""Runs the next override of the chain, or the default work."""
OverrideCall = Callable[["Learner", Proceed], None]
"""A bound ``backward`` or ``step`` override."""


@runtime_checkable
class MetricsProvider(Protocol):
    """A callback that computes named values at each pass end (``callbacks.MetricsCB``).

    ``values`` holds the last values of every pass, keyed ``<pass>_<name>``
    (``valid_accuracy``), the keys ``names()`` lists: what monitors (early stopping,
    model saving) watch. ``last_pass()`` holds the last pass's values by name alone
    (``accuracy``): what ``Learner.validate`` returns.
    """

    @property
    def values(self) -> Mapping[str, float]:
        """The last value of each ``<pass>_<name>``."""
        ...

    def names(self) -> list[str]:
        """Return the keys ``values`` will have."""
        ...

    def last_pass(self) -> Mapping[str, float]:
        """Return the values of the last pass, by name alone."""
        ...


class Override(StrEnum):
    """The pieces of a batch's work that one callback may take over."""

    PREDICT = "predict"
    COMPUTE_LOSS = "compute_loss"
    BACKWARD = "backward"
    STEP = "step"


class Callback:
    """Base class of callbacks: every hook is a no-op until a subclass overrides it.

    ``order`` sorts callbacks on every hook, ascending; ties keep list order.
    """

    order: int = 0

    def before_fit(self, learn: Learner) -> None:
        """Run when the fit starts, before the first epoch."""

    def before_epoch(self, learn: Learner) -> None:
        """Run when a training or validation pass starts (``learn.training`` says which)."""

    def before_batch(self, learn: Learner) -> None:
        """Run when a batch starts; may replace ``learn.batch``."""

    def after_predict(self, learn: Learner) -> None:
        """Run after the forward pass; may replace ``learn.preds``."""

    def after_loss(self, learn: Learner) -> None:
        """Run after the loss is computed; may replace ``learn.loss``."""

    def after_backward(self, learn: Learner) -> None:
        """Run after the backward pass of a training batch (gradients are ready)."""

    def after_step(self, learn: Learner) -> None:
        """Run after the optimizer step of a training batch."""

    def after_batch(self, learn: Learner) -> None:
        """Run when a batch completes; the batch is still in progress until it returns."""

    def after_epoch(self, learn: Learner) -> None:
        """Run when a pass completes; the pass is still in progress until it returns."""

    def after_fit(self, learn: Learner) -> None:
        """Run when the fit completes; the fit is still in progress until it returns."""

    def after_cancel_batch(self, learn: Learner) -> None:
        """Run after a CancelBatchException abandoned the batch (after_batch does not run)."""

    def after_cancel_epoch(self, learn: Learner) -> None:
        """Run after a CancelEpochException abandoned the pass (after_epoch does not run)."""

    def after_cancel_fit(self, learn: Learner) -> None:
        """Run after a CancelFitException abandoned the fit (after_fit does not run)."""

    def after_fail(self, learn: Learner) -> None:
        """Run after an exception failed the run; ``learn.failure`` says what and where."""

    def cleanup_batch(self, learn: Learner) -> None:
        """Run when a batch ends by any route (completed, cancelled, failed), after its hook."""

    def cleanup_epoch(self, learn: Learner) -> None:
        """Run when a pass ends by any route (completed, cancelled, failed), after its hook."""

    def cleanup_fit(self, learn: Learner) -> None:
        """Run when a fit ends by any route (completed, cancelled, failed), after its hook."""

    def after_preempt(self, learn: Learner) -> None:
        """Run after a preemption (SIGTERM) stopped the fit at a checkpoint (after_fit does not)."""

    def state_dict(self) -> dict[str, Any]:
        """Return what a checkpoint must hold to resume this callback exactly ({}: nothing).

        Values are what ``torch.load(weights_only=True)`` reads back: tensors, numbers,
        strings, booleans, None, and lists, tuples and dicts of them.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what ``state_dict`` returned (a callback with state overrides both)."""
        if state:
            msg = (
                f"{type(self).__name__} was given state ({', '.join(map(str, state))}) but "
                "keeps none: it does not override load_state_dict"
            )
            raise InvalidCallbackError(msg)

    def predict(self, learn: Learner, proceed: Proceed) -> None:  # noqa: ARG002 (the signature overrides keep)
        """Override: set ``learn.preds`` (and ``learn.output``); ``proceed()`` runs the rest."""
        proceed()

    def compute_loss(self, learn: Learner, proceed: Proceed) -> None:  # noqa: ARG002 (the signature overrides keep)
        """Override: set ``learn.loss`` from the predictions; ``proceed()`` runs the rest."""
        proceed()

    def backward(self, learn: Learner, proceed: Proceed) -> None:  # noqa: ARG002 (the signature overrides keep)
        """Override: compute gradients from ``learn.loss``; ``proceed()`` runs the rest."""
        proceed()

    def step(self, learn: Learner, proceed: Proceed) -> None:  # noqa: ARG002 (the signature overrides keep)
        """Override: update the weights and zero the gradients; ``proceed()`` runs the rest."""
        proceed()

    def __repr__(self) -> str:
        """Name the class and the order, as errors and notes show callbacks."""
        return f"{type(self).__name__}(order={self.order})"


_HOOK_NAMES: Final = frozenset(Hook)
_OVERRIDE_NAMES: Final = frozenset(Override)
_KNOWN_NAMES: Final = sorted(_HOOK_NAMES | _OVERRIDE_NAMES)
_HOOKLIKE_PREFIXES: Final = ("before_", "after_", "cleanup_", "on_")


_Methods = tuple[tuple[str, object], ...]

_CHECKED: Final[weakref.WeakKeyDictionary[type, _Methods]] = weakref.WeakKeyDictionary()
"""The classes whose hook names and signatures were checked, with the methods checked."""


def _own_callables(klass: type) -> _Methods:
    """Return the public callables ``klass`` defines itself (not Callback, not object)."""
    return tuple(
        (name, value)
        for base in klass.__mro__
        if base not in {Callback, object}
        for name, value in vars(base).items()
        if callable(value) and not name.startswith("_")
    )


def _check_signature(cb: Callback, name: str, params: str, n_args: int) -> None:
    method = getattr(cb, name)
    try:
        inspect.signature(method).bind(*range(n_args))
    except TypeError:
        msg = (
            f"{type(cb).__name__}.{name} must accept ({params}), "
            f"got {name}{inspect.signature(method)}"
        )
        raise InvalidCallbackError(msg) from None


def _check_hook_names(cb: Callback) -> None:
    """Check ``cb``'s hook-like methods, once per class while its methods stay the same."""
    klass = type(cb)
    methods = _own_callables(klass)
    if _CHECKED.get(klass) == methods:  # the same function objects: checked already
        return
    _check_methods(cb, methods)
    _CHECKED[klass] = methods


def _check_methods(cb: Callback, methods: _Methods) -> None:
    for name, _ in methods:
        if name in _HOOK_NAMES:
            _check_signature(cb, name, "learn", 1)
            continue
        if name in _OVERRIDE_NAMES:
            _check_signature(cb, name, "learn, proceed", 2)
            continue
        close = difflib.get_close_matches(name, _KNOWN_NAMES, n=1, cutoff=0.8)
        if close or name.startswith(_HOOKLIKE_PREFIXES):
            hint = f"did you mean {close[0]}? " if close else ""
            msg = (
                f"{type(cb).__name__}.{name} looks like a hook or an override but is none: "
                f"{hint}valid hooks are {', '.join(Hook)}; overrides are "
                f"{', '.join(Override)} (rename a helper method, or start it with _)"
            )
            raise InvalidCallbackError(msg)


def _check_order(cb: Callback) -> None:
    order = cb.order
    if not isinstance(order, int) or isinstance(order, bool):
        msg = f"{type(cb).__name__}.order must be an int, got {order!r} ({type(order).__name__})"
        raise InvalidCallbackError(msg)


def validate_callbacks(cbs: object) -> list[Callback]:
    """Return ``cbs`` as a new list after checking each is a well-formed Callback.

    ``cbs`` is an iterable of callbacks (a list, a tuple, a generator: read once), one
    callback alone (as fastai takes it), or None for none.
    """
    if cbs is None:
        return []
    if isinstance(cbs, Callback):
        cbs = [cbs]
    if isinstance(cbs, str | bytes | Mapping) or not isinstance(cbs, Iterable):
        msg = (
            f"cbs must be a list (or other iterable) of fsm_learner.Callback instances, one "
            f"Callback, or None; got {type(cbs).__name__}"
        )
        raise InvalidCallbackError(msg)
    checked: list[Callback] = []
    for i, cb in enumerate(cbs):
        if not isinstance(cb, Callback):
            hint = " (a class: pass an instance)" if isinstance(cb, type) else ""
            msg = (
                f"cbs[{i}] must be an instance of fsm_learner.Callback, "
                f"got {safe_text(cb, 80)} of type {type(cb).__name__}{hint}"
            )
            raise InvalidCallbackError(msg)
        _check_order(cb)
        _check_hook_names(cb)
        checked.append(cb)
    return checked


def _implements(cb: Callback, name: str) -> bool:
    return getattr(type(cb), name) is not getattr(Callback, name)


@attrs.frozen
class Dispatch:
    """Which callbacks run on each hook, in order, and which override each piece of work."""

    hooks: Mapping[Hook, tuple[tuple[Callback, HookCall], ...]]
    overrides: Mapping[Override, tuple[Callback, ...]]


def chain_overrides(
    callbacks: tuple[Callback, ...],
    override: Override,
    default: HookCall,
    around: Callable[[Callback, OverrideCall], OverrideCall] | None = None,
) -> HookCall:
    """Compose the overrides of ``callbacks`` (in order, outermost first) around ``default``.

    ``around(cb, method)``, when given, returns what the chain calls instead of each bound
    override (``Learner(profile_hooks=True)`` times them); without it, the bound methods.
    """
    call = default
    for cb in reversed(callbacks):
        method: OverrideCall = getattr(cb, override)
        call = _link(method if around is None else around(cb, method), call)
    return call


def _link(method: OverrideCall, inner: HookCall) -> HookCall:
    def run(learn: Learner) -> None:
        method(learn, lambda: inner(learn))

    return run


def resolve_dispatch(cbs: Iterable[Callback]) -> Dispatch:
    """Work out, once per run, the ordered bound hooks and the overrides."""
    ordered = sorted(cbs, key=lambda cb: cb.order)  # stable: ties keep list order
    hooks = {
        hook: tuple((cb, getattr(cb, hook)) for cb in ordered if _implements(cb, hook))
        for hook in Hook
    }
    overrides = {
        override: tuple(cb for cb in ordered if _implements(cb, override)) for override in Override
    }
    return Dispatch(MappingProxyType(hooks), MappingProxyType(overrides))
