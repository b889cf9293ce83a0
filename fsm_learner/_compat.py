"""What Python 3.10 lacks and 3.11 has: StrEnum and exception notes (PEP 678)."""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover (exercised only on 3.10)

    class StrEnum(str, Enum):
        """A str that is also an Enum member, as enum.StrEnum is on 3.11."""

        def __str__(self) -> str:
            return str(self.value)


def add_note(exc: BaseException, note: str) -> bool:
    """Attach ``note`` to ``exc`` as PEP 678 does (``__notes__`` on 3.10); never raises.

    Return False when the exception refuses notes (a frozen dataclass or attrs
    exception cannot take the ``__notes__`` attribute): the exception itself matters more.
    """
    try:
        if sys.version_info >= (3, 11):
            exc.add_note(note)
        else:  # pragma: no cover (exercised only on 3.10)
            notes = list(getattr(exc, "__notes__", ()))
            exc.__notes__ = [*notes, note]
    except BaseException:  # noqa: BLE001 (a note is never worth losing the exception)
        return False
    return True


__all__ = ["StrEnum", "add_note"]
