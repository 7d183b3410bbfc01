"""The turn API: one turn evaluated now, a batch accepted for later, and the webhook deliveries
of the tenant's alerts."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# name dependencies built inside turns_router.

import time
import uuid
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Request

from monitor.logs import bind
from monitor.service.batcher import NotRunningError
from monitor.service.db import PendingTurn
from monitor.service.ingest import TurnRequest, TurnTooLongError, UnknownPipelineError
from monitor.service.keys import Principal
from monitor.service.runtime import state_of
from monitor.service.schemas import (
    AUTH_REFUSED,
    BODY_REFUSED,
    TurnBatchIn,
    TurnIn,
    TurnOut,
    VerdictOut,
)
from monitor.service.settings import ServiceSettings


def turns_router(
    role: Callable[[str], Callable[..., Principal]], settings: ServiceSettings
) -> APIRouter:
    """``role(name)`` is the app's dependency for a key with that role."""
    router = APIRouter()

    @router.post(
        "/v1/turns",
        response_model=TurnOut,
        tags=["turns"],
        responses={**AUTH_REFUSED, **BODY_REFUSED, 404: {"description": "unknown pipeline"}},
    )
    async def post_turn(
        body: TurnIn,
        request: Request,
        who: Annotated[Principal, Depends(role("ingest"))],
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                min_length=1,
                max_length=200,
                description="A retry with the same key (per tenant) is stored once and answered "
                "with the first one's turn and alert ids (duplicate: true).",
            ),
        ] = None,
    ) -> TurnOut:
        """Evaluate one turn synchronously; fired rules become alerts (stored, then sent)."""
        state = state_of(request)
        started = time.perf_counter()
        source_id = f"http:{idempotency_key}" if idempotency_key is not None else None
        try:
            done = await state.ingest.submit(TurnRequest.of(body, who.tenant, source_id=source_id))
        except UnknownPipelineError as exc:
            state.metrics.rejected.labels("unknown_pipeline").inc()
            raise HTTPException(404, str(exc)) from None
        except TurnTooLongError as exc:
            state.metrics.rejected.labels("too_long").inc()
            raise HTTPException(413, str(exc)) from None
        except NotRunningError as exc:  # shutting down: another instance takes the retry
            raise HTTPException(503, f"{exc}; retry") from None
        bind(turn_id=done.turn_id)  # the access line names the turn recorded
        state.metrics.request_seconds.labels(done.pipeline).observe(time.perf_counter() - started)
        return TurnOut(
            turn_id=done.turn_id,
            conversation_id=done.conversation_id,
            verdicts=[
                VerdictOut(
                    detector=v.detector, score=round(v.score, 6), fired=v.fired, severity=v.severity
                )
                for v in done.verdicts
            ],
            alert_ids=done.alert_ids,
            n_tokens=done.n_tokens,
            dropped_tokens=done.dropped_tokens,
            windows=done.windows,
            unread_parts=done.unread_parts,
            duplicate=done.duplicate,
        )

    @router.post(
        "/v1/turns/batch",
        status_code=202,
        tags=["turns"],
        responses={**AUTH_REFUSED, **BODY_REFUSED, 404: {"description": "unknown pipeline"}},
    )
    def post_turn_batch(
        body: TurnBatchIn, request: Request, who: Annotated[Principal, Depends(role("ingest"))]
    ) -> dict[str, list[str]]:
        """Accept up to ``MAX_BATCH_TURNS`` turns for evaluation; they are stored durably first,
        evaluated in the background, and appear under their turn ids when done."""
        state = state_of(request)
        if len(body.turns) > settings.max_batch_turns:
            problem = {
                "loc": ["body", "turns"],
                "type": "too_long",
                "msg": f"at most {settings.max_batch_turns} turns",
            }
            raise HTTPException(422, [problem])
        for i, t in enumerate(body.turns):
            try:
                state.ingest.check(TurnRequest.of(t, who.tenant))
            except UnknownPipelineError as exc:
                raise HTTPException(404, str(exc)) from None
            except TurnTooLongError as exc:
                state.metrics.rejected.labels("too_long").inc()
                raise HTTPException(413, f"turns[{i}]: {exc}") from None
        ids = [str(uuid.uuid4()) for _ in body.turns]
        with state.sessions() as session:
            for turn_id, t in zip(ids, body.turns, strict=True):
                session.add(
                    PendingTurn(id=turn_id, tenant=who.tenant, body=t.model_dump(mode="json"))
                )
            session.commit()
        state.pending_event.set()
        return {"turn_ids": ids}

    return router
