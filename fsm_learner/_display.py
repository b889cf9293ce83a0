"""Showing untrusted text to people: one line, no control characters, bounded in length.

What an audit log, a file name or a callback's class name holds reaches a terminal, an
error message or a diagram. ``printable`` makes it inert there: control characters (an
ANSI escape, a newline that would start a forged line) become visible escapes.
``shown`` describes a received value for an error message without recursing into it
(a log may hold values nested a thousand levels deep) and without copying megabytes.
``file_name`` renders a path whose bytes are not UTF-8 as text that any stream accepts.
``safe_text`` and ``exception_text`` describe an object (an exception, above all) whose
``__str__`` may raise or return pages: a failure path must not fail with what it describes.
"""

from __future__ import annotations

import os
import reprlib
from typing import Final

__all__ = ["exception_text", "file_name", "printable", "safe_text", "shown"]

SHOWN_LIMIT: Final = 120
"""The longest description ``shown`` returns, in characters."""

_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    r"""Return ``text`` with every non-printable character as a visible escape (``\x1b``).

    Non-printable is ``str.isprintable``'s sense: control characters, line and paragraph
    separators, format characters (bidirectional overrides), surrogates, unassigned.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    short.maxstring = 60
    short.maxlong = short.maxother = 40
    return short


_REPR: Final = _short_repr()


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """Return a short ``repr`` of ``value``: nesting cut at 3 levels, one printable line."""
    try:
        text = repr(value[:limit]) if isinstance(value, str) else _REPR.repr(value)
    except Exception:  # noqa: BLE001 (a description must never fail)
        text = f"<{type(value).__name__}>"
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_name(path: str | os.PathLike[str]) -> str:
    r"""Return a path as valid, printable text: bytes that are not UTF-8 as ``\xff``."""
    return printable(os.fsencode(path).decode("utf-8", "backslashreplace"))


_LIMIT: Final = 500


def safe_text(obj: object, limit: int = _LIMIT) -> str:
    """Return ``str(obj)``, cut to ``limit`` characters; never raises.

    When ``str`` itself raises, say so with the type's name instead.
    """
    try:
        text = str.__str__(str(obj))  # an exact str: a subclass's len() or slicing may raise
        return text if len(text) <= limit else text[: limit - 3] + "..."
    except BaseException as exc:  # noqa: BLE001 (a description must not fail)
        return f"<{_type_name(obj)} whose str() raised {_type_name(exc)}>"


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
