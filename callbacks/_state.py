"""Reading back what a stock callback's ``state_dict`` returned: keys and types, checked.

A checkpoint is read with ``torch.load(weights_only=True)``, so its state holds tensors,
numbers, strings, booleans, None and containers of them. These checks raise
``CheckpointError`` naming the callback, the key, what was received and what was expected,
as every ``load_state_dict`` of the callbacks does; ``bool`` is refused where an ``int``
is expected (Python counts it as one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, cast

from fsm_learner.exceptions import CheckpointError

__all__ = ["state_keys", "state_list", "state_optional", "state_value"]

_T = TypeVar("_T")


def state_keys(owner: str, state: object, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """Return ``state`` when it is a mapping that has every one of ``keys``."""
    if not isinstance(state, Mapping):
        msg = (
            f"{owner}.load_state_dict needs the mapping {owner}.state_dict() returned (keys "
            f"{', '.join(keys)}), got {type(state).__name__}"
        )
        raise CheckpointError(msg)
    missing = [key for key in keys if key not in state]
    if missing:
        msg = (
            f"{owner}: the state to load lacks {', '.join(missing)}; expected the keys "
            f"{', '.join(keys)} ({owner}.state_dict()), got {', '.join(map(str, state)) or 'none'}"
        )
        raise CheckpointError(msg)
    return state


def _fits(value: object, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def state_value(
    owner: str, state: Mapping[str, Any], key: str, kind: type[_T], expected: str
) -> _T:
    """Return ``state[key]`` when it is a ``kind`` (``expected`` says so in words)."""
    value = state[key]
    if not _fits(value, kind):
        msg = (
            f"{owner}: state[{key!r}] must be {expected}, got {_shown(value)} of type "
            f"{type(value).__name__}"
        )
        raise CheckpointError(msg)
    return cast("_T", value)


def state_optional(
    owner: str, state: Mapping[str, Any], key: str, kind: type[_T], expected: str
) -> _T | None:
    """Return ``state[key]`` when it is None or a ``kind``."""
    if state[key] is None:
        return None
    return state_value(owner, state, key, kind, f"None or {expected}")


def state_list(
    owner: str, state: Mapping[str, Any], key: str, kind: type[_T], expected: str
) -> list[_T]:
    """Return ``state[key]`` as a list when it is a list or tuple of ``kind`` items."""
    value = state[key]
    if not isinstance(value, list | tuple) or not all(_fits(item, kind) for item in value):
        msg = (
            f"{owner}: state[{key!r}] must be a list of {expected}, got {_shown(value)} of "
            f"type {type(value).__name__}"
        )
        raise CheckpointError(msg)
    return [cast("_T", item) for item in value]


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
