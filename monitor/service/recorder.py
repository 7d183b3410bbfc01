"""Recording an evaluated turn: one transaction holds the turn (redacted), its per-token
features, its verdicts, and the alerts, outbox rows and webhook deliveries the alerting policy
makes of them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from detectors.engine import Verdict
from monitor.messages import Message
from monitor.pipeline import EncodedInput
from monitor.service import features
from monitor.service.alerting import Alerts, AlertSpec
from monitor.service.db import Alert, Turn, VerdictRow, search_text, utcnow
from monitor.service.monitored import Monitored
from monitor.service.redacted import Redacted
from monitor.service.settings import ServiceSettings


@dataclass(frozen=True)
class Recorded:
    turn_id: str
    conversation_id: str  # as stored (redacted)
    alert_ids: list[str] = field(default_factory=list)
    duplicate: bool = False
    alerts: list[tuple[str, str]] = field(default_factory=list)  # (detector, severity) made
    silenced: list[str] = field(default_factory=list)  # detectors whose fire a silence withheld


def record(
    sessions: sessionmaker[Session],
    *,
    tenant: str,
    conversation_id: str,
    messages: list[Message],
    metadata: dict[str, Any],
    monitored: Monitored,
    encoded: EncodedInput,
    verdicts: list[Verdict],
    settings: ServiceSettings,
    source_id: str | None = None,
    turn_id: str | None = None,
) -> Recorded:
    """Store one evaluated turn, its features, verdicts, alerts and outbox rows, atomically.

    With a ``source_id`` the turn is stored once per tenant: a second delivery returns the
    first one's ids (``duplicate=True``). A detector's ``alerting`` policy applies here: within
    its cooldown a fire is counted on the conversation's last alert instead of making a new
    one; when its window's count of the tenant's fires is reached, an escalation alert is made
    (once per window).
    """
    turn_id = turn_id or str(uuid.uuid4())
    now = utcnow()
    stored = Redacted.of(conversation_id, messages, metadata, encoded, settings)
    metadata, conversation_id = stored.metadata, stored.conversation_id
    with sessions() as session:
        if source_id is not None:
            found = _existing(session, tenant, source_id)
            if found is not None:
                return found
        session.add(
            Turn(
                id=turn_id,
                tenant=tenant,
                conversation_id=conversation_id,
                source_id=source_id,
                pipeline=monitored.config.name,
                created_at=now,
                messages=stored.messages,
                search_text=search_text(stored.messages),
                meta=metadata,
                n_tokens=len(encoded.ids),
                dropped=encoded.dropped,
                sae_fingerprint=monitored.pipeline.sae.identity,
            )
        )
        session.flush()
        session.add(features.row(turn_id, encoded, stored.tokens))
        evidence = [stored.evidence(v.evidence_json()) for v in verdicts]
        for v, e in zip(verdicts, evidence, strict=True):
            session.add(
                VerdictRow(
                    turn_id=turn_id,
                    detector=v.detector,
                    kind=v.kind,
                    score=v.score,
                    fired=v.fired,
                    severity=v.severity,
                    evidence=e,
                )
            )
        session.flush()
        alerts = Alerts(
            session,
            tenant,
            conversation_id,
            turn_id,
            now,
            monitored.config.name,
            metadata,
            settings.delivery_targets(),
        )
        alert_ids = []
        for v, e in zip(verdicts, evidence, strict=True):
            if not v.fired or (v.kind != "rule" and not settings.alert_on_probes):
                continue
            spec = AlertSpec(
                v.detector, v.kind, v.severity, v.score, monitored.summaries.get(v.detector, ""), e
            )
            alert_ids.extend(alerts.fired(spec, monitored.alerting.get(v.detector)))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            if source_id is not None:  # a concurrent delivery of the same turn won the race
                found = _existing(session, tenant, source_id)
                if found is not None:
                    return found
            raise
    return Recorded(
        turn_id, conversation_id, alert_ids, alerts=alerts.created, silenced=alerts.silenced
    )


def _existing(session: Session, tenant: str, source_id: str) -> Recorded | None:
    turn = session.scalar(select(Turn).where(Turn.tenant == tenant, Turn.source_id == source_id))
    if turn is None:
        return None
    ids = session.scalars(select(Alert.id).where(Alert.turn_id == turn.id)).all()
    return Recorded(turn.id, turn.conversation_id, list(ids), duplicate=True)
