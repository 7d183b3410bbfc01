"""Schema upgrades on a real PostgreSQL: instances starting together upgrade one at a time."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from monitor.service.db import make_engine, upgrade

pytestmark = pytest.mark.integration


def test_concurrent_upgrades_of_a_fresh_database_all_succeed(pg_url: str) -> None:
    name = f"upgrade_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    engines = [make_engine(url) for _ in range(4)]
    try:
        pool = ThreadPoolExecutor(len(engines))
        try:
            futures = [pool.submit(upgrade, e) for e in engines]
            for f in futures:  # raises if an upgrade collided with another (or waits on one)
                f.result(timeout=120)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        with engines[0].connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            tables = conn.execute(
                text(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = "
                    "'public' AND tablename = 'turns'"
                )
            ).scalar()
        assert len(versions) == 1 and tables == 1
    finally:
        for e in engines:
            e.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def test_migration_backfills_search_text(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        upgrade(engine, "0004")
        messages = json.dumps(
            [
                {"role": "user", "content": "Where is the LIBRARY?"},
                {"role": "assistant", "content": "Crème Street."},
            ]
        )
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO turns (id, tenant, conversation_id, pipeline, created_at, "
                    "messages, metadata, n_tokens, dropped) "
                    "VALUES ('t1', 'a', 'c', 'p', '2026-01-01', :m, '{}', 3, 0)"
                ),
                {"m": messages},
            )
        upgrade(engine)
        with engine.connect() as conn:
            stored = conn.execute(text("SELECT search_text FROM turns")).scalar()
        assert stored == "where is the library?\ncrème street."
    finally:
        engine.dispose()
