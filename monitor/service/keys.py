"""API keys: random, shown once, stored as a SHA-256 hash, bound to one tenant and one role.

Roles: ``ingest`` (send turns), ``read`` (alerts, conversations), ``triage`` (what ``read``
may, and acknowledge, resolve, label and annotate alerts, silence detectors), ``admin``
(everything).
A key is 32 bytes of randomness, so a plain SHA-256 is enough to store it (no password
stretching is needed for a secret nobody chose).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal, get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from monitor.service.db import ApiKey

KeyRole = Literal["ingest", "read", "triage", "admin"]
ROLES: tuple[KeyRole, ...] = get_args(KeyRole)
PREFIX = "smk_"
# What a role may do besides what its own name says: admin everything, triage what read may.
_ALSO: dict[str, tuple[str, ...]] = {"admin": ROLES, "triage": ("read",)}


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str
    author: str = ""  # the key's name, else its prefix: who made a triage change or a note

    def may(self, role: str) -> bool:
        return role == self.role or role in _ALSO.get(self.role, ())


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant: str, role: str, name: str | None = None) -> str:
    """A new key; ``name`` (who holds it) is what triage history and notes show as author."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not tenant or len(tenant) > 64:
        raise ValueError("tenant must be 1-64 characters")
    if name is not None and not 1 <= len(name.strip()) <= 64:
        raise ValueError("name must be 1-64 characters")
    key = PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            tenant=tenant,
            role=role,
            key_hash=_hash(key),
            prefix=key[:10],
            name=name.strip() if name is not None else None,
        )
    )
    return key


def authenticate(session: Session, key: str) -> Principal | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == _hash(key)))
    if row is None or row.revoked_at is not None:
        return None
    return Principal(row.tenant, row.role, row.name or row.prefix)


def revoke_key(session: Session, prefix: str) -> int:
    """Revoke the live keys starting with ``prefix`` (as shown by ``keys list``); how many."""
    from monitor.service.db import utcnow

    if len(prefix) < len(PREFIX) + 4:
        raise ValueError(f"give at least {len(PREFIX) + 4} characters of the key")
    rows = session.scalars(
        select(ApiKey).where(ApiKey.prefix == prefix[:10], ApiKey.revoked_at.is_(None))
    ).all()
    matching = [r for r in rows if len(prefix) <= 10 or r.key_hash == _hash(prefix)]
    for r in matching:
        r.revoked_at = utcnow()
    return len(matching)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)).all())
