"""Conversations the service tests send: one a scam e-mail fires on, one nothing fires on; and
stored turns as the tests seed them."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import uuid

from monitor.localservices import wait_http
from monitor.service.db import Alert, Turn, utcnow

# A Standard Webhooks secret for the tests' receivers: whsec_ + base64 of 32 bytes.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"the tests' webhook secret: 32 b.").decode()

SCAM = [
    {
        "role": "user",
        "content": "Is this e-mail real?\n\nSubject: You have WON $1,000,000!!!\n\n"
        "Dear Winner, CONGRATULATIONS! Your e-mail address has won ONE MILLION DOLLARS in our "
        "international lottery. To claim your FREE prize, send your bank account number, full "
        "name and a processing fee of $99 today. Act NOW, this offer expires in 24 hours! Click "
        "here to claim your cash: http://claim-prize.example",
    },
]
PLAIN = [
    {"role": "user", "content": "What time does the library open on Saturdays?"},
    {"role": "assistant", "content": "It opens at 10 a.m. on Saturdays and closes at 4 p.m."},
]


def turn_row(
    tenant: str,
    conversation_id: str,
    *,
    messages: list[dict[str, str]] | None = None,
    meta: dict[str, str] | None = None,
    n_tokens: int = 1,
    created_at: dt.datetime | None = None,
    pipeline: str = "smollm2-135m-instruct",
) -> Turn:
    """A stored turn as the tests seed it straight into the database (no model run)."""
    return Turn(
        id=str(uuid.uuid4()),
        tenant=tenant,
        conversation_id=conversation_id,
        pipeline=pipeline,
        created_at=created_at or utcnow(),
        messages=messages or [],
        search_text="",
        meta=meta or {},
        n_tokens=n_tokens,
        dropped=0,
    )


def start_serve(
    cli: str, env: dict[str, str], port: int, stderr: int
) -> tuple[subprocess.Popen[str], str]:
    """A ``safety-monitor serve`` process on ``port`` (stdout piped, ``stderr`` as given) and its
    base URL; ``wait_ready`` until it answers."""
    server = subprocess.Popen(
        [cli, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    return server, f"http://127.0.0.1:{port}"


def wait_ready(server: subprocess.Popen[str], base: str, seconds: float = 180) -> None:
    """Until a ``safety-monitor serve`` process answers ``/readyz`` with 200 (it must not exit)."""
    wait_http(f"{base}/readyz", server, seconds, "serve")


def alert_row(
    turn: Turn,
    *,
    detector: str = "scam_email",
    severity: str = "high",
    score: float = 1.5,
    summary: str = "seeded",
) -> Alert:
    """A rule alert on a seeded turn (``turn_row``, flushed), as the triage tests seed them."""
    return Alert(
        id=str(uuid.uuid4()),
        turn_id=turn.id,
        tenant=turn.tenant,
        conversation_id=turn.conversation_id,
        pipeline=turn.pipeline,
        detector=detector,
        kind="rule",
        severity=severity,
        score=score,
        summary=summary,
        created_at=utcnow(),
        evidence={},
    )
