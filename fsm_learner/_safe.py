"""Describing arbitrary objects without trusting them: for notes, logs and messages.

An exception's ``__str__`` may raise, recurse or return pages of text; a failure path
that describes it must not fail with it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["exception_text", "safe_text"]

_LIMIT: Final = 500


def safe_text(obj: object, limit: int = _LIMIT) -> str:
    """Return ``str(obj)``, cut to ``limit`` characters; never raises.

    When ``str`` itself raises, say so with the type's name instead.
    """
    try:
        text = str(obj)
        if not isinstance(text, str):  # pragma: no cover (str() enforces it)
            text = object.__repr__(obj)
    except BaseException as exc:  # noqa: BLE001 (a description must not fail)
        text = f"<{_type_name(obj)} whose str() raised {_type_name(exc)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exception_text(exc: BaseException, limit: int = _LIMIT) -> str:
    """Return ``Type: message`` (or just ``Type``) for an exception; never raises."""
    message = safe_text(exc, limit)
    name = _type_name(exc)
    return f"{name}: {message}" if message else name


def _type_name(obj: object) -> str:
    try:
        name = type(obj).__name__
    except BaseException:  # noqa: BLE001 (a description must not fail)
        return "object"
    return name if isinstance(name, str) else "object"
