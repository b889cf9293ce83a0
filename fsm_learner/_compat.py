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


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` as PEP 678 does (``__notes__`` on 3.10)."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # pragma: no cover (exercised only on 3.10)
        notes = list(getattr(exc, "__notes__", ()))
        exc.__notes__ = [*notes, note]


__all__ = ["StrEnum", "add_note"]
