"""The setting checks the stock callbacks share: whole counts and numbers with bounds.

``bool`` is an ``int`` to Python, so ``True`` would pass a bare ``isinstance(x, int)``;
these checks refuse it, and their messages name the setting, what is valid and what was
received, as every ``ConfigurationError`` of the callbacks does.
"""

from __future__ import annotations

import math

from fsm_learner import ConfigurationError

__all__ = ["check_count", "check_number"]


def _hint(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""


def _shown(value: object) -> str:
    try:
        return repr(value)
    except ValueError:  # an int too long to print
        return "an int of more than 4,300 digits"


def check_count(name: str, value: object, *, minimum: int, meaning: str = "") -> int:
    """Return ``value`` when it is an int (not a bool) >= ``minimum``.

    ``meaning`` says what the count counts, for the message.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{name} must be an int >= {minimum}{_hint(meaning)}, got {_shown(value)}"
        raise ConfigurationError(msg)
    return value


def check_number(
    name: str, value: object, *, low: float = 0.0, strict: bool = False, finite: bool = True
) -> float:
    """Return ``value`` as a float when it is an int or float (not a bool) above ``low``.

    ``strict`` excludes ``low`` itself; ``finite=False`` admits infinity (NaN never).
    """
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float: 10**400
            number = math.inf
    above = number > low if strict else number >= low
    if not above or (finite and not math.isfinite(number)):
        kind = "a finite number" if finite else "a number"
        msg = f"{name} must be {kind} {'>' if strict else '>='} {low:g}, got {_shown(value)}"
        raise ConfigurationError(msg)
    return number
