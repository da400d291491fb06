"""What a collector's answer means for a batch, and the one retry loop the exporter and ``layerwatch sync`` share.

=========================================  ==========  =====================================================
answer                                     outcome     what happens to the batch
=========================================  ==========  =====================================================
2xx                                        delivered   acknowledged: it leaves memory or the spool
no answer, 408, 429, 500, 502, 503, 504    retry       sent again after a jittered, growing wait (Retry-After
                                                       is a floor); meanwhile later batches wait on disk
401, 403, 404                              keep        the job is misconfigured (token, URL), the data is fine:
                                                       sending stops, everything stays in the spool for
                                                       ``layerwatch sync``
400, 413, 415, 422                         poison      the collector cannot take this batch: it is set aside
                                                       in ``rejected/``, counted, and the next one is sent
any other 5xx / 4xx                        retry/keep  as 500 / as 404
=========================================  ==========  =====================================================
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from layerwatch.transport import Delivery, Transport, backoff

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
KEEP_STATUSES = frozenset({401, 403, 404})
POISON_STATUSES = frozenset({400, 413, 415, 422})


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    KEEP = "keep"
    POISON = "poison"


def classify(result: Delivery) -> Outcome:
    """The table above, for one attempt."""
    if result.ok:
        return Outcome.DELIVERED
    status = result.status
    if status is None or status in RETRY_STATUSES or status >= 500:
        return Outcome.RETRY
    if status in POISON_STATUSES:
        return Outcome.POISON
    return Outcome.KEEP


def deliver(
    transport: Transport,
    payload: bytes,
    wait: Callable[[float, Delivery], bool],
    attempts: int | None = None,
    max_backoff: float = 30.0,
) -> tuple[Outcome, Delivery]:
    """Send ``payload`` until its outcome is final, ``attempts`` are spent (None: no limit), or ``wait`` says stop.

    ``wait(seconds, last_result)`` sleeps between attempts (the exporter's is interruptible by ``close()``)
    and returns False to give up early; the outcome is then RETRY: the batch is still the caller's to keep.
    """
    attempt = 0
    while True:
        result = transport.post_batch(payload)
        outcome = classify(result)
        attempt += 1
        if outcome is not Outcome.RETRY or (attempts is not None and attempt >= attempts):
            return outcome, result
        if not wait(backoff(attempt - 1, result.retry_after, cap=max_backoff), result):
            return outcome, result
