"""Argument checks at the public boundary, in the caller's words (after trio:
the parameter's own name in the message)."""

from __future__ import annotations

from typing import Any, Optional, Union


#: SQLite's largest integer: seqnos, counts and limits live in its columns.
INT_MAX = 2**63 - 1


def check_int(name: str, value: Any, minimum: int = 0, maximum: Optional[int] = INT_MAX) -> int:
    """Raises ValueError unless ``value`` is an int (not a bool) between
    ``minimum`` and ``maximum`` (None: no bound, for a caller that compares
    it with something smaller itself)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, not {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {INT_MAX} (SQLite's largest integer), not {value}")
    return value


def check_bound(name: str, value: Any, minimum: int = 0) -> int:
    """``check_int`` for a bound or a count (``purge``, ``batch``,
    ``max_attempts``): any integer >= ``minimum``, one beyond SQLite's
    largest integer taken as that integer (no message is ever past it).

    Raises:
        ValueError: ``value`` is not an integer (or is a bool), or is below
            ``minimum``.
    """
    return min(check_int(name, value, minimum, maximum=None), INT_MAX)


def _seconds(name: str, value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        raise ValueError(f"`{name}` is too large a number of seconds ({len(str(value))} digits)") from None


def check_seconds(name: str, value: Any, *, allow_none: bool = True, positive: bool = False) -> Optional[float]:
    """Raises ValueError unless ``value`` is a non-negative number (or
    None), or with ``positive`` a number > 0 (a lease, a request timeout)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a non-negative number of seconds{extra}, not {value!r}")
    if positive and value == 0:
        raise ValueError(f"`{name}` must be a positive number of seconds, not 0")
    return _seconds(name, value)


def check_wait(wait: Any) -> Union[bool, float]:
    """``wait`` is True, False or a non-negative number of seconds."""
    if isinstance(wait, bool):
        return wait
    if isinstance(wait, (int, float)) and wait == wait and wait >= 0:
        return _seconds("wait", wait)
    raise ValueError(f"`wait` must be True, False or a non-negative number of seconds, not {wait!r}")
