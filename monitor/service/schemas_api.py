"""The published contract, served without a key: the alert payload's JSON Schema and the
AsyncAPI description of the Kafka topics (both generated from ``contract.AlertPayload``)."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.

from typing import Any

from fastapi import APIRouter

from monitor.service.contract import alert_schema, asyncapi


def schemas_router() -> APIRouter:
    router = APIRouter(tags=["contract"])

    @router.get("/v1/schemas/alert")
    def get_alert_schema() -> dict[str, Any]:
        """JSON Schema (2020-12) of an alert as Kafka and webhooks carry it."""
        return alert_schema()

    @router.get("/v1/schemas/asyncapi")
    def get_asyncapi() -> dict[str, Any]:
        """AsyncAPI 3.0 document of the topics: alerts out, turns in, refused turns."""
        return asyncapi()

    return router
