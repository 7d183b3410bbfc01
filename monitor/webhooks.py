"""For webhook receivers: verify a delivery from safety-monitor and read its alert.

Deliveries follow Standard Webhooks (https://www.standardwebhooks.com): the ``webhook-id``
header is the alert id (the same on every retry: de-duplicate by it), ``webhook-timestamp`` the
send time in Unix seconds, ``webhook-signature`` one ``v1,<base64 HMAC-SHA256>`` per active secret
of ``"{id}.{timestamp}.{body}"``. Any Standard Webhooks library verifies them; this helper adds
what a receiver of this service wants on top: several accepted secrets (rotation), the alert
parsed and checked against the published contract, and one error type::

    from monitor.webhooks import verify, WebhookVerificationError

    try:
        alert = verify(body, request.headers, secrets=["whsec_..."])
    except WebhookVerificationError as exc:
        return 401, str(exc)

A full receiver: ``examples/webhook_receiver.py``; the contract: ``docs/alerts.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from monitor.service.contract import AlertPayload

__all__ = ["WebhookVerificationError", "verify"]


def verify(body: bytes | str, headers: Mapping[str, str], secrets: Iterable[str]) -> AlertPayload:
    """The alert of a delivery whose signature one of ``secrets`` makes and whose timestamp is
    within 5 minutes of now; ``WebhookVerificationError`` otherwise (a replayed delivery's
    timestamp is too old, a forged one matches no secret, a body outside the contract)."""
    text = body if isinstance(body, str) else body.decode()
    plain = {k.lower(): v for k, v in headers.items()}
    failure: WebhookVerificationError | None = None
    for secret in secrets:
        try:
            Webhook(secret).verify(text, plain, json_parse=False)
        except WebhookVerificationError as exc:
            failure = exc
            continue
        try:
            alert = AlertPayload.model_validate_json(text)
        except ValueError as exc:
            raise WebhookVerificationError(f"signed, but not an alert: {exc}") from None
        if alert.alert_id != plain["webhook-id"]:
            raise WebhookVerificationError("webhook-id is not the alert's id")
        return alert
    raise failure or WebhookVerificationError("no secret given")
