"""Webhook deliveries of the caller's tenant: listed, and dead-lettered ones retried."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# include dependencies built inside the router factory.

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from monitor.service.deliveries import DeliveryFilter, Status, list_deliveries, retry_dead
from monitor.service.keys import Principal
from monitor.service.runtime import state_of
from monitor.service.schemas import AUTH_REFUSED, BODY_REFUSED


class RetryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    webhook: str | None = Field(default=None, description="Only this webhook's or sink's.")
    since: AwareDatetime | None = Field(
        default=None, description="Only alerts made at or after (ISO 8601 with offset)."
    )


class RetryOut(BaseModel):
    retried: int = Field(description="Dead-lettered deliveries due again now.")


def deliveries_router(role: Callable[[str], Callable[..., Principal]]) -> APIRouter:
    router = APIRouter(tags=["alerts"], responses=AUTH_REFUSED)

    @router.get("/v1/webhooks/deliveries")
    def get_deliveries(
        request: Request,
        who: Annotated[Principal, Depends(role("read"))],
        status: Status | None = None,
        webhook: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        """Webhook deliveries of this tenant's alerts: pending, delivered or dead-lettered."""
        flt = DeliveryFilter(tenant=who.tenant, webhook=webhook)
        with state_of(request).sessions() as session:
            return {"deliveries": list_deliveries(session, flt, status, limit)}

    @router.post("/v1/webhooks/deliveries/retry", responses=BODY_REFUSED)
    def post_retry(
        request: Request, who: Annotated[Principal, Depends(role("admin"))], body: RetryIn
    ) -> RetryOut:
        """Send this tenant's dead-lettered deliveries again, from a fresh round of attempts."""
        since: dt.datetime | None = body.since
        flt = DeliveryFilter(tenant=who.tenant, webhook=body.webhook, since=since)
        with state_of(request).sessions() as session:
            return RetryOut(retried=retry_dead(session, flt))

    return router
