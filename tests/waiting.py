"""The one way tests wait: on a condition, with a deadline. A fixed sleep is too short on a busy machine and
too long on a quiet one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 15.0,
    message: str | Callable[[], object] = "the condition",
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail the test after ``timeout``
    seconds, saying what was awaited (``message``, or what calling it returns: the state at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
