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
    """Which background loops are failing or not ready yet, since when and why; a loop that
    reports each round (``beat``) is failing too once it stops coming round (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, tuple[float, str]] = {}
        # Not ready, but not failing either (starting, no work assigned): since when, why.
        self._waiting: dict[str, tuple[float, str]] = {}
        # Loops that report each round: when the last one was, how long the next may take.
        self._beats: dict[str, tuple[float, float]] = {}

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
            self._waiting.pop(name, None)
        if gone is not None:
            log.info("%s loop recovered after %.1f s", name, time.monotonic() - gone[0])

    def waiting(self, name: str, why: str) -> None:
        """``name`` is not ready, and that is no fault (starting, nothing assigned to it yet):
        reported by ``failing`` like a failure, without the warning."""
        with self._lock:
            since = self._waiting.get(name, (time.monotonic(), why))[0]
            self._waiting[name] = (since, why)
            self._beats.pop(name, None)

    def beat(self, name: str, within_s: float) -> None:
        """A round of ``name`` went well (as ``ok``), and the next one is due within
        ``within_s`` seconds: a loop that stops coming round (stuck) is reported failing."""
        self.ok(name)
        with self._lock:
            self._beats[name] = (time.monotonic(), within_s)

    def failing(self) -> dict[str, str]:
        """Failing loops: name -> ``"<error> (for N s)"``."""
        now = time.monotonic()
        with self._lock:
            out = {
                n: f"{why} (for {now - since:.0f} s)" for n, (since, why) in self._waiting.items()
            }
            out |= {
                n: f"{why} (for {now - since:.0f} s)" for n, (since, why) in self._failing.items()
            }
            for n, (last, within) in self._beats.items():
                if n not in out and now - last > within:
                    out[n] = f"stalled: no round for {now - last:.0f} s (due within {within:g} s)"
            return out
