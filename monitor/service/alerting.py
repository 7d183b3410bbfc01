"""From fired verdicts to alerts: the cooldown and escalation policy, and the rows an alert is.

``decide`` is the policy alone, on what the store knows (``Recent``): testable without a model
or a database. ``Alerts`` reads those facts inside the recording transaction and writes what
was decided: the alert row, its outbox row (Kafka) and a delivery row per webhook or sink
(Slack, PagerDuty, Alertmanager) that wants it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from detectors.rules import Alerting
from monitor.service.contract import alert_payload
from monitor.service.db import Alert, Outbox, Turn, VerdictRow, WebhookDelivery
from monitor.service.settings import WebhookConfig
from monitor.service.silences import active_silence, count_fire
from monitor.service.sink_settings import AnySink


@dataclass(frozen=True)
class Recent:
    """What the policy reads about the past, as of this fire (which is already counted)."""

    cooling: bool = False  # this conversation has an alert of the detector within its cooldown
    fires_in_window: int = 0  # the tenant's fires of the detector within the window
    escalated_in_window: bool = False  # an escalation alert was made within the window


@dataclass(frozen=True)
class Decision:
    alert: bool  # a new alert for this fire
    fold: bool  # counted on the conversation's last alert instead (within the cooldown)
    escalate: bool  # an escalation alert for the tenant (once per window)


def decide(policy: Alerting | None, recent: Recent) -> Decision:
    """What one fire of a detector with this policy becomes."""
    if policy is None:
        return Decision(alert=True, fold=False, escalate=False)
    fold = policy.cooldown_seconds is not None and recent.cooling
    window = policy.window
    escalate = (
        window is not None
        and recent.fires_in_window >= window.count
        and not recent.escalated_in_window
    )
    return Decision(alert=not fold, fold=fold, escalate=escalate)


@dataclass(frozen=True)
class AlertSpec:
    detector: str
    kind: str  # rule | probe | escalation
    severity: str
    score: float
    summary: str
    evidence: dict[str, Any]


@dataclass
class Alerts:
    """Alerts of one turn being recorded, in the recording's session (one transaction)."""

    session: Session
    tenant: str
    conversation_id: str
    turn_id: str
    now: dt.datetime
    pipeline: str
    metadata: dict[str, Any]
    webhooks: Sequence[WebhookConfig | AnySink]  # every delivery target: webhooks and sinks
    created: list[tuple[str, str]] = field(default_factory=list)  # (detector, severity)
    silenced: list[str] = field(default_factory=list)  # detectors whose fire a silence withheld

    def fired(self, spec: AlertSpec, policy: Alerting | None) -> list[str]:
        """Apply the policy to one fire; the ids of the alerts it made (none, one or two).
        Under an active silence (``silences``) none: the fire is stored and counted only."""
        if self._silenced(spec):
            return []
        recent, last = self._recent(spec.detector, policy)
        decision = decide(policy, recent)
        made = []
        if decision.fold:
            assert last is not None
            last.suppressed += 1
        if decision.alert:
            made.append(self.alert(spec))
        if decision.escalate:
            assert policy is not None and policy.window is not None
            window, fires = policy.window, recent.fires_in_window
            made.append(
                self.alert(
                    AlertSpec(
                        spec.detector,
                        "escalation",
                        window.severity,
                        float(fires),
                        f"{spec.detector} fired {fires} times for this tenant within "
                        f"{window.seconds} s (threshold {window.count})",
                        {"fires": fires, "window_seconds": window.seconds},
                    )
                )
            )
        return made

    def alert(self, a: AlertSpec) -> str:
        """An alert row, its outbox row and its deliveries (webhooks and sinks)."""
        alert_id = str(uuid.uuid4())
        row = Alert(
            id=alert_id,
            turn_id=self.turn_id,
            tenant=self.tenant,
            conversation_id=self.conversation_id,
            pipeline=self.pipeline,
            detector=a.detector,
            kind=a.kind,
            severity=a.severity,
            score=a.score,
            summary=a.summary,
            created_at=self.now,
            evidence=a.evidence,
        )
        self.session.add(row)
        self.session.flush()
        payload = alert_payload(row, self.metadata)
        self.session.add(Outbox(alert_id=alert_id, key=self.conversation_id, payload=payload))
        for hook in self.webhooks:
            if hook.wants(self.tenant, a.detector, a.severity):
                self.session.add(
                    WebhookDelivery(alert_id=alert_id, webhook=hook.name, next_attempt_at=self.now)
                )
        self.created.append((a.detector, a.severity))
        return alert_id

    def _silenced(self, spec: AlertSpec) -> bool:
        """Whether a silence withholds this fire (one with a feature pattern: by the features of
        its evidence); if so its verdict row names the silence and the silence counts it."""
        detector = spec.detector
        silence = active_silence(
            self.session, self.tenant, detector, self.pipeline, self.now, spec.evidence
        )
        if silence is None:
            return False
        self.session.execute(
            update(VerdictRow)
            .where(
                VerdictRow.turn_id == self.turn_id,
                VerdictRow.detector == detector,
                VerdictRow.fired.is_(True),
            )
            .values(silence_id=silence.id)
            .execution_options(synchronize_session=False)
        )
        count_fire(self.session, silence.id)
        self.silenced.append(detector)
        return True

    def _recent(self, detector: str, policy: Alerting | None) -> tuple[Recent, Alert | None]:
        """The facts ``decide`` reads (queried only where the policy uses them), and the
        conversation's alert a fire within the cooldown is counted on."""
        if policy is None:
            return Recent(), None
        last = None
        if policy.cooldown_seconds is not None:
            since = self.now - dt.timedelta(seconds=policy.cooldown_seconds)
            last = self.session.scalar(
                select(Alert)
                .where(
                    Alert.tenant == self.tenant,
                    Alert.conversation_id == self.conversation_id,
                    Alert.detector == detector,
                    Alert.kind != "escalation",
                    Alert.created_at >= since,
                )
                .order_by(Alert.created_at.desc())
                .limit(1)
            )
        if policy.window is None:
            return Recent(cooling=last is not None), last
        since = self.now - dt.timedelta(seconds=policy.window.seconds)
        fires = (
            self.session.scalar(
                select(func.count())
                .select_from(VerdictRow)
                .join(Turn, Turn.id == VerdictRow.turn_id)
                .where(
                    Turn.tenant == self.tenant,
                    VerdictRow.detector == detector,
                    VerdictRow.fired.is_(True),
                    VerdictRow.silence_id.is_(None),  # silenced fires do not escalate later
                    Turn.created_at >= since,
                )
            )
            or 0
        )
        escalated = self.session.scalar(
            select(func.count())
            .select_from(Alert)
            .where(
                Alert.tenant == self.tenant,
                Alert.detector == detector,
                Alert.kind == "escalation",
                Alert.created_at >= since,
            )
        )
        return Recent(last is not None, int(fires), bool(escalated)), last
