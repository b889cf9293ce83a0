"""Learner(profile_hooks=True): each callback's hooks and overrides timed, per pass.

The learner compiles its routes with each hook call wrapped (``timed_hooks``) and its
work chains with each override wrapped for its self time (``work_chains``) only when
profiling, so an unprofiled fit runs the callbacks' own bound methods. ``HookTimes`` holds
the calls and nanoseconds per (callback, hook or override) since the last ``hook_times``
note; ``note_rows`` splits its rows into notes the log can hold.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import update_wrapper
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import attrs
import orjson

from fsm_learner.audit.codec import MAX_NOTE_BYTES
from fsm_learner.callback import Callback, HookCall, Override, chain_overrides
from fsm_learner.machine import Hook
from fsm_learner.work import DEFAULT_WORK

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from fsm_learner.callback import Dispatch, OverrideCall, Proceed
    from fsm_learner.learner import Learner

__all__ = [
    "HookCalls",
    "HookTimes",
    "hook_slots",
    "note_rows",
    "positions_of",
    "timed_hooks",
    "work_chains",
]

_now_ns: Final = time.monotonic_ns

HookCalls = Mapping[Hook, tuple[tuple[Callback, HookCall], ...]]
_Column = Hook | Override
"""What a hook_times row times of a callback: a hook, or an override (its self time)."""
_Slot = tuple[str, int, _Column]
"""A profiled (callback, column): the callback's class name, its index in ``learn.cbs``, what."""
_COLUMN_ORDER: Final[Mapping[_Column, int]] = MappingProxyType(
    {column: index for index, column in enumerate((*Hook, *Override))},
)
_ROWS_PER_NOTE: Final = 1024
"""Rows of one ``hook_times`` note at most (the audit reads no more)."""
_NOTE_BUDGET: Final = MAX_NOTE_BYTES - 4096
"""Bytes of rows (as JSON, a comma each) one ``hook_times`` note holds at most: the rest of
the note (its name, ``{"hooks":[`` and ``]}``) fits in the margin, under ``MAX_NOTE_BYTES``."""


@attrs.define(eq=False)
class HookTimes:
    """Calls and nanoseconds per profiled (callback, column) since the last ``hook_times`` note.

    The timed hook calls and overrides add to ``calls`` and ``ns`` in place, at their
    slot's index. An override counts one call per run of its chain (``chain_runs``, the
    serial of the current one; ``counted``, per slot, the last run it counted), however
    often the override before it proceeded: a chain runs once per batch.
    """

    slots: tuple[_Slot, ...]
    calls: list[int]
    ns: list[int]
    counted: list[int]
    chain_runs: list[int]
    slot_of: Mapping[tuple[int, _Column], int]

    @classmethod
    def of(cls, slots: tuple[_Slot, ...]) -> HookTimes:
        """Return zeroed times for ``slots``."""
        zeros = [0] * len(slots)
        slot_of = {(index, column): slot for slot, (_, index, column) in enumerate(slots)}
        return cls(slots, list(zeros), list(zeros), list(zeros), [0], MappingProxyType(slot_of))

    def reset(self) -> None:
        """Forget what was timed (a new run starts)."""
        self.calls[:] = self.ns[:] = [0] * len(self.slots)

    def take(self) -> list[list[object]]:
        """Return ``[callback, index, column, calls, ns]`` per slot that ran, and start again."""
        rows: list[list[object]] = [
            [name, index, column.value, calls, ns]
            for (name, index, column), calls, ns in zip(
                self.slots, self.calls, self.ns, strict=True
            )
            if calls
        ]
        if rows:
            self.reset()
        return rows


def positions_of(cbs: Iterable[Callback]) -> dict[int, int]:
    """Return each callback's index in ``cbs`` (its first, should it be there twice), by id."""
    positions: dict[int, int] = {}
    for index, cb in enumerate(cbs):
        positions.setdefault(id(cb), index)
    return positions


def hook_slots(dispatch: Dispatch, positions: Mapping[int, int]) -> tuple[_Slot, ...]:
    """Return the (callback, hook or override) pairs of the dispatch, by index, then column."""
    slots: set[_Slot] = {
        (type(cb).__name__, positions[id(cb)], hook)
        for hook, calls in dispatch.hooks.items()
        for cb, _ in calls
    }
    slots.update(
        (type(cb).__name__, positions[id(cb)], override)
        for override, cbs in dispatch.overrides.items()
        for cb in cbs
    )
    return tuple(sorted(slots, key=lambda slot: (slot[1], _COLUMN_ORDER[slot[2]])))


def _timed(call: HookCall, times: HookTimes, slot: int) -> HookCall:
    """Wrap ``call`` to add its calls and time to ``times`` at ``slot``; it raises as it did."""
    calls, spent = times.calls, times.ns

    def timed(learn: Learner) -> None:
        start = _now_ns()
        try:
            call(learn)
        finally:
            spent[slot] += _now_ns() - start
            calls[slot] += 1

    return update_wrapper(timed, call)  # __wrapped__: the bound hook


def timed_hooks(hooks: HookCalls, positions: Mapping[int, int], times: HookTimes) -> HookCalls:
    """Return ``hooks`` with each call timed: one wrapper per (callback, hook), for every route."""
    slot_of = times.slot_of
    return MappingProxyType(
        {
            hook: tuple(
                (cb, _timed(call, times, slot_of[positions[id(cb)], hook])) for cb, call in calls
            )
            for hook, calls in hooks.items()
        },
    )


def _self_timed(method: OverrideCall, times: HookTimes, slot: int) -> OverrideCall:
    """Wrap an override to add its self time to ``times`` at ``slot``; it raises as it did.

    Its self time: the time in it less the time in what it proceeded to (the next
    override, or the default work, which is no callback's).
    """
    calls, spent, counted, runs = times.calls, times.ns, times.counted, times.chain_runs

    def timed(learn: Learner, proceed: Proceed) -> None:
        inner = 0

        def timed_proceed() -> None:
            nonlocal inner
            start = _now_ns()
            try:
                proceed()
            finally:
                inner += _now_ns() - start

        start = _now_ns()
        try:
            method(learn, timed_proceed)
        finally:
            spent[slot] += max(0, _now_ns() - start - inner)
            if counted[slot] != runs[0]:  # once per run of the chain
                counted[slot] = runs[0]
                calls[slot] += 1

    return update_wrapper(timed, method)  # __wrapped__: the bound override


def _counted_chain(chain: HookCall, runs: list[int]) -> HookCall:
    """Wrap a profiled chain to number its runs (``HookTimes.chain_runs``)."""

    def run(learn: Learner) -> None:
        runs[0] += 1
        chain(learn)

    return run


def work_chains(
    dispatch: Dispatch, times: HookTimes | None, positions: Mapping[int, int] | None
) -> dict[Override, HookCall]:
    """Chain each piece of work's overrides around its default; profiled, each one timed."""
    if times is None or positions is None:
        return {
            override: chain_overrides(dispatch.overrides[override], override, default)
            for override, default in DEFAULT_WORK.items()
        }
    chains: dict[Override, HookCall] = {}
    for override, default in DEFAULT_WORK.items():
        cbs = dispatch.overrides[override]

        def around(
            cb: Callback, method: OverrideCall, override: Override = override
        ) -> OverrideCall:
            return _self_timed(method, times, times.slot_of[positions[id(cb)], override])

        chain = chain_overrides(cbs, override, default, around)
        chains[override] = _counted_chain(chain, times.chain_runs) if cbs else default
    return chains


def note_rows(rows: list[list[object]]) -> Iterator[list[list[object]]]:
    """Split ``hook_times`` rows into notes of ``_ROWS_PER_NOTE`` rows, ``_NOTE_BUDGET`` bytes.

    A row over the budget alone (a class name of half a megabyte) is left out: no note
    can hold it.
    """
    chunk: list[list[object]] = []
    size = 0
    for row in rows:
        row_size = len(orjson.dumps(row)) + 1  # and its comma
        if row_size > _NOTE_BUDGET:
            continue
        if chunk and (len(chunk) == _ROWS_PER_NOTE or size + row_size > _NOTE_BUDGET):
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += row_size
    if chunk:
        yield chunk
