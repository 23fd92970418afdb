"""Registries that rate-limit (GHCR: ~2,000 layers a minute per token): pushes slow down instead of failing.

A proxy in front of a real docker-registry keeps a sliding-window budget of blob requests (scaled down from a
minute to a second) and answers 429 beyond it, without Retry-After, as a budget-exhausted registry may. It
records how many requests were in flight when each arrived, so the back-off is measured, not inferred.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import pytest
import requests
from fixtures_registry import FaultProxy, RegistryServer, needs_registry

from imgpack.schemas import spec

pytestmark = [needs_registry, pytest.mark.usefixtures("isolated_credentials", "no_network_env")]

BUDGET = (30, 1.0)  # blob requests per second
CONCURRENCY = 8


@pytest.fixture
def limited(open_registry: RegistryServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(open_registry, budget=BUDGET)
    yield proxy
    proxy.stop()


def test_pushes_in_a_row_finish_under_a_layer_budget_and_back_off(cli, store, make_model, limited):
    names = []
    for i in range(3):
        make_model(store, f"budget{i}:1", {"transformer": 10 + i, "text_encoder": 20 + i, "vae": 30 + i},
                   tensors=12, rows=8)
        names.append(f"budget{i}:1")

    spans = []
    for name in names:
        start = len(limited.log)
        r = cli("push", name, f"{limited.host}/{name}", "--concurrency", str(CONCURRENCY))
        assert r.code == 0, r.err
        spans.append(limited.log[start:])
        # What the registry holds is the stored manifest, byte for byte.
        resp = requests.get(f"{limited.upstream.url}/v2/{name.replace(':', '/manifests/')}",
                            headers={"Accept": ", ".join(spec.MANIFEST_ACCEPT)}, timeout=10)
        assert resp.content == store.get_manifest(name).raw

    for span in spans:
        statuses = [e.status for e in span]
        assert statuses.count(429) >= 5, "the budget was never hit: the test proves nothing"
        first = next(i for i, e in enumerate(span) if e.status == 429)
        before = [e.in_flight for e in span[:first]]
        after = [e.in_flight for e in span[first:]]
        # Full concurrency until the registry said slow down, then mostly at or below half of it.
        assert max(before) > CONCURRENCY // 2
        assert max(e.in_flight for e in span) <= CONCURRENCY
        assert statistics.median(after) <= CONCURRENCY // 4


def test_retry_after_is_honoured(cli, store, make_model, limited):
    """With Retry-After, the same request comes back no sooner than the registry asked."""
    limited.budget = (4, 1.0)
    limited.retry_after = "1"
    make_model(store, "patient:1", {"vae": 40}, tensors=4)
    r = cli("push", "patient:1", f"{limited.host}/patient:1", "--concurrency", "4")
    assert r.code == 0, r.err
    by_blob: dict[str, list] = {}  # a HEAD names its blob, so its replays can be told apart
    for e in limited.log:
        if e.method == "HEAD" and "/blobs/" in e.path:
            by_blob.setdefault(e.path, []).append(e)
    gaps = [b.at - a.at for events in by_blob.values() for a, b in zip(events, events[1:], strict=False)
            if a.status == 429]
    assert gaps and min(gaps) >= 0.95


def test_a_registry_that_is_down_is_not_taken_for_a_rate_limit(cli, store, make_model, limited):
    """A bare 503 (no Retry-After) is an outage: the push fails after the usual few attempts, not five minutes."""
    limited.budget = None
    limited.add("HEAD", r"/blobs/sha256:", "status", times=10_000, arg=503)
    make_model(store, "down:1", {"vae": 41}, tensors=2)
    started = time.monotonic()
    r = cli("push", "down:1", f"{limited.host}/down:1")
    assert r.code == 5 and "503" in r.err and limited.host in r.err, r.err
    assert time.monotonic() - started < 60
    heads = [e for e in limited.log if e.method == "HEAD" and "/blobs/" in e.path]
    assert len(heads) <= 5 * 8  # at most the usual attempts for each blob in flight
