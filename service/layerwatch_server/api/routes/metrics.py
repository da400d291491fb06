"""GET /metrics: Prometheus exposition (text, or OpenMetrics when asked). Unauthenticated, like /healthz:
protect it at the network (scrape from inside the cluster) if run names are sensitive."""

from __future__ import annotations

import gzip

from fastapi import APIRouter, Request
from fastapi.responses import Response

from layerwatch_server.api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, state: StateDep) -> Response:
    body, content_type = state.telemetry.render(request.headers.get("accept"))
    if "gzip" in request.headers.get("accept-encoding", "") and len(body) > 4096:  # Prometheus asks for gzip
        return Response(gzip.compress(body, 1), media_type=content_type, headers={"Content-Encoding": "gzip"})
    return Response(body, media_type=content_type)
