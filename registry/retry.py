"""Retrying and pacing registry requests: one policy for the whole transport, and adaptive concurrency.

The transport is the only place that replays a request (status, ``Retry-After``, backoff with full jitter, a
time budget per request). The copy engine retries only what the transport cannot replay: content that failed
its digest, a stream that ended early (resumed with ``Range``), an upload that must restart.

:class:`AdaptiveLimit` bounds requests in flight and adapts to the registry: a 429 or 503 halves the limit
(multiplicative decrease), every run of successes at the current limit raises it by one (additive increase)
back to the configured maximum — so a push under GHCR's layers-per-minute budget slows down instead of failing.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from imgpack.schemas.errors import ImgpackError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
THROTTLE_STATUSES = frozenset({429, 503})


class Cancelled(ImgpackError):
    """The transfer was interrupted (Ctrl-C); finished work is kept for the next run."""

    exit_code = 130


def parse_retry_after(value: str | None, limit: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), capped at ``limit``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, min(float(value), limit))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - time.time(), limit))


@dataclass
class RetryPolicy:
    """When and how long to wait before replaying a request."""

    attempts: int = 5
    #: A throttled request (429, or 503 with Retry-After) is replayed until the time budget is spent, at most this
    #: often: a registry's per-minute budget (GHCR: ~2,000 layers a minute) can take tens of seconds to refill.
    throttled_attempts: int = 60
    backoff_base: float = 0.2
    backoff_max: float = 10.0
    retry_after_max: float = 60.0
    #: Upper bound on the time one request may spend in retries (waits included).
    budget: float = 300.0
    statuses: frozenset[int] = RETRY_STATUSES
    cancel: threading.Event = field(default_factory=threading.Event)

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.backoff_max, self.backoff_base * (2**attempt)))

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        honoured = parse_retry_after(retry_after, self.retry_after_max)
        return honoured if honoured is not None else self.backoff(attempt)

    def sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise Cancelled("interrupted")

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("interrupted")

    def attempts_for(self, started: float, attempt: int, wait: float, throttled: bool = False) -> bool:
        """Whether another attempt after waiting ``wait`` seconds stays within the attempts and the budget."""
        limit = self.throttled_attempts if throttled else self.attempts
        return attempt + 1 < limit and time.monotonic() - started + wait <= self.budget


def throttled_answer(status: int, retry_after: str | None) -> bool:
    """A rate limit rather than an outage: 429, or 503 with ``Retry-After``. Only these are replayed for the whole
    time budget; a registry answering a bare 503 (down) fails after the usual attempts."""
    return status == 429 or (status == 503 and bool(retry_after))


class AdaptiveLimit:
    """A semaphore whose size follows the registry's throttling (AIMD), between 1 and ``maximum``."""

    def __init__(self, maximum: int) -> None:
        self.maximum = max(1, maximum)
        self.limit = self.maximum
        self.in_flight = 0
        self._successes = 0
        self._cond = threading.Condition()
        self.throttled = 0  # how often the limit was cut, for reports and tests

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._cond:
            while self.in_flight >= self.limit:
                self._cond.wait(0.5)
            self.in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify()

    def throttle(self) -> None:
        """The registry said slow down: halve the limit."""
        with self._cond:
            self.limit = max(1, self.limit // 2)
            self._successes = 0
            self.throttled += 1

    def success(self) -> None:
        with self._cond:
            if self.limit >= self.maximum:
                return
            self._successes += 1
            if self._successes >= self.limit:
                self.limit += 1
                self._successes = 0
                self._cond.notify()
