"""Health of the background loops (batch drain, retention, dispatch) and their retry pace.

A loop that cannot reach the database keeps running: it records that it is failing (``/readyz``
reports the instance unready meanwhile), waits a little longer after each failure, and records
its recovery on the first round that succeeds.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

log = logging.getLogger(__name__)

# What a database outage raises (refused or dropped connections, a restart, a full pool).
DB_UNAVAILABLE: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeoutError,
)


class Backoff:
    """Doubling waits from ``first`` up to ``cap`` seconds; ``reset`` after a success.

    The cap is short because outages are usually short: a loop should be back within seconds
    of the database.
    """

    def __init__(self, first: float = 0.25, cap: float = 5.0) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        wait = self._next
        self._next = min(self.cap, self._next * 2)
        return wait

    def reset(self) -> None:
        self._next = self.first


class Loops:
    """Which background loops are failing, since when and why (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, tuple[float, str]] = {}

    def failed(self, name: str, exc: BaseException) -> None:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        with self._lock:
            first = name not in self._failing
            since = self._failing.get(name, (time.monotonic(), why))[0]
            self._failing[name] = (since, why)
        if first:  # once per outage, not once per retry
            log.warning("%s loop failing, retrying with backoff: %s", name, why, exc_info=exc)

    def ok(self, name: str) -> None:
        with self._lock:
            gone = self._failing.pop(name, None)
        if gone is not None:
            log.info("%s loop recovered after %.1f s", name, time.monotonic() - gone[0])

    def failing(self) -> dict[str, str]:
        """Failing loops: name -> ``"<error> (for N s)"``."""
        now = time.monotonic()
        with self._lock:
            return {
                n: f"{why} (for {now - since:.0f} s)" for n, (since, why) in self._failing.items()
            }
