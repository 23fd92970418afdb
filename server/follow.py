"""Waiting on a job while watching its client: both APIs (OpenAI's and ollama's) answer through this.

The HTTP worker that owns a request polls its socket between the job's events; a client that hangs up gets its
job cancelled (a queued one leaves the queue, a running one stops at its next step), and a failed write to a
stream means the same.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

from imgpack.server.jobs import PREVIEW, PROGRESS, Job, ModelManager
from imgpack.server.wire import ClientGone, Exchange, printable

log = logging.getLogger("imgpack.server")

POLL_SECONDS = 0.05  # how often a waiting request thread checks its client's socket
HEARTBEAT_SECONDS = 10.0  # a stream's keep-alive write while it waits, so dead clients show up as failed writes


def job_events(
    exchange: Exchange, manager: ModelManager, job: Job, heartbeat: Callable[[], None] | None = None,
) -> Iterator[tuple[str, Any]]:
    """The job's events, until its last one; cancels the job and raises ``ClientGone`` if the client leaves."""
    last_write = time.monotonic()
    while True:
        try:
            kind, payload = job.events.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if exchange.client_gone():
                abandon(exchange, manager, job)
            if heartbeat is not None and time.monotonic() - last_write > HEARTBEAT_SECONDS:
                guarded(exchange, manager, job, heartbeat)
                last_write = time.monotonic()
            continue
        if kind in (PROGRESS, PREVIEW) and exchange.client_gone():
            abandon(exchange, manager, job)
        yield kind, payload
        last_write = time.monotonic()
        if kind not in (PROGRESS, PREVIEW):
            return


def abandon(exchange: Exchange, manager: ModelManager, job: Job) -> None:
    manager.cancel(job)
    log.info("client %s went away; cancelled job %s", printable(exchange.request.peer), job.id)
    raise ClientGone


def guarded(exchange: Exchange, manager: ModelManager, job: Job, write: Callable[[], None]) -> None:
    """Run a write to the client; if it fails, the client is gone and so is its job."""
    try:
        write()
    except ClientGone:
        abandon(exchange, manager, job)


def cancel_unless_finished(manager: ModelManager, job: Job) -> None:
    """Whatever ended the request, nobody is waiting for this job any more."""
    if job.state in ("queued", "running"):
        manager.cancel(job)
