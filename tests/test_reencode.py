"""Re-encoding stored history with a new SAE (``db reencode``), on the real model and shipped
SAE, over SQLite and a real PostgreSQL: features replaced from the stored (redacted) text,
fingerprints recorded at ingest and by the run, verdicts and alerts untouched, resumable,
filtered, the audit and the backtest showing which dictionary read each turn; and on Ray."""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from samples import PLAIN, SCAM
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from monitor.cli import app as cli
from monitor.messages import Message
from monitor.sae.builtin import placeholder_topk_sae, shipped_sae_dir
from monitor.sae.saelens import load_sae, save_sae
from monitor.service.app import create_app
from monitor.service.audit import AuditFilter
from monitor.service.backtest import backtest, candidate_from_catalog
from monitor.service.db import Alert, Turn, TurnFeatures, VerdictRow, make_engine, upgrade
from monitor.service.features import StoredFeatures
from monitor.service.ingest import Ingest, Ingested, TurnRequest
from monitor.service.keys import create_key
from monitor.service.metrics import Metrics
from monitor.service.monitored import Monitored
from monitor.service.reencode import (
    PageEncoder,
    Scope,
    load_spec,
    local_pages,
    reencode,
)
from monitor.service.settings import ServiceSettings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PII = [
    {"role": "user", "content": "Please write to me at jane.doe@example.com about my order."},
    {"role": "assistant", "content": "Of course, I will send the details there."},
]
OTHER = [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]


@dataclass(frozen=True)
class NewSAE:
    path: Path
    fingerprint: str
    inverse: np.ndarray  # old feature index -> its index in the new SAE


@pytest.fixture(scope="module")
def new_sae(monitored: Monitored, tmp_path_factory: pytest.TempPathFactory) -> NewSAE:
    """The shipped SAE with its features permuted: the same dictionary under other indices, so
    every re-encoded token's features are its old ones, renumbered."""
    shipped = shipped_sae_dir(monitored.pipeline.model.name)
    assert shipped is not None
    sae = load_sae(shipped)
    perm = torch.randperm(sae.d_sae, generator=torch.Generator().manual_seed(7))
    s = sae.stored
    tensors = {"W_enc": s["W_enc"][:, perm], "b_enc": s["b_enc"][perm], "W_dec": s["W_dec"][perm]}
    permuted = type(sae)(sae.cfg, {**s, **tensors})
    path = save_sae(permuted, tmp_path_factory.mktemp("sae") / "permuted")
    return NewSAE(path, load_sae(path).identity, torch.argsort(perm).numpy())


@pytest.fixture(scope="module")
def encoder(monitored: Monitored, new_sae: NewSAE) -> PageEncoder:
    """The new SAE's page encoder, as the command builds it, loaded once for the module."""
    settings = ServiceSettings()
    config = settings.resolved_pipelines()[0]
    return PageEncoder(load_spec(settings.pipeline_settings(config), new_sae.path))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of this test's own: a SQLite file, or a new PostgreSQL
    database on the session's cluster (so that a run over every tenant meets only these)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'monitor.db'}"
        return
    pg_url: str = request.getfixturevalue("pg_url")
    name = f"reencode_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class World:
    url: str
    sessions: sessionmaker[Session]
    turns: dict[str, str]  # name -> turn id
    tenants: dict[str, str]  # name -> tenant

    def features(self) -> dict[str, StoredFeatures]:
        with self.sessions() as s:
            rows = s.scalars(select(TurnFeatures)).all()
            return {r.turn_id: StoredFeatures.of(r) for r in rows}

    def fingerprints(self) -> dict[str, str | None]:
        with self.sessions() as s:
            return {i: fp for i, fp in s.execute(select(Turn.id, Turn.sae_fingerprint))}

    def decisions(self) -> list[tuple[Any, ...]]:
        """Every verdict and alert as stored: what reencode must leave alone."""
        with self.sessions() as s:
            verdicts = s.execute(
                select(VerdictRow.turn_id, VerdictRow.detector, VerdictRow.score, VerdictRow.fired)
            ).all()
            alerts = s.execute(select(Alert.id, Alert.turn_id, Alert.score, Alert.evidence)).all()
        return sorted(map(tuple, verdicts)) + sorted(
            (a[0], a[1], a[2], json.dumps(a[3])) for a in alerts
        )


TURNS = {  # name -> (tenant, messages)
    "scam": ("a", SCAM),
    "plain": ("a", PLAIN),
    "pii": ("a", PII),
    "other": ("b", OTHER),
    "plain_b": ("b", PLAIN),
}


def _world(url: str, monitored: Monitored) -> World:
    """The turns of ``TURNS`` recorded through the one ingest path (the worker's way in)."""
    engine = make_engine(url)
    upgrade(engine)
    sessions = sessionmaker(engine)
    settings = ServiceSettings(database_url=url, retention_interval_s=0)
    ingest = Ingest({monitored.config.name: monitored}, sessions, settings, Metrics())
    run = uuid.uuid4().hex[:8]
    tenants = {t: f"{t}-{run}" for t in ("a", "b")}
    requests = [
        TurnRequest(tenants[tenant], f"{name}-{run}", [Message(**m) for m in messages])
        for name, (tenant, messages) in TURNS.items()
    ]
    done = [d for d in ingest.ingest(requests) if isinstance(d, Ingested)]
    assert len(done) == len(TURNS)
    return World(url, sessions, {n: d.turn_id for n, d in zip(TURNS, done, strict=True)}, tenants)


def _renumbered(old: StoredFeatures, new: StoredFeatures, sae: NewSAE) -> float:
    """The share of tokens whose new features are their old ones renumbered (same values)."""
    assert old.tokens == new.tokens, "the same text read the same way"
    same = 0
    for t in range(len(old.tokens)):
        a = slice(int(old.indptr[t]), int(old.indptr[t + 1]))
        b = slice(int(new.indptr[t]), int(new.indptr[t + 1]))
        want = sorted(
            zip(sae.inverse[old.indices[a]].tolist(), old.values[a].tolist(), strict=True)
        )
        got = sorted(zip(new.indices[b].tolist(), new.values[b].tolist(), strict=True))
        same += len(want) == len(got) and all(
            i == j and abs(v - w) <= 1e-2 * max(1.0, abs(v))
            for (i, v), (j, w) in zip(want, got, strict=True)
        )
    return same / len(old.tokens)


def _cli(url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    monkeypatch.setenv("SAFETY_MONITOR_DATABASE_URL", url)
    return CliRunner().invoke(cli, ["db", "reencode", *args])


def _said(result: Any) -> str:
    """The command's output with line breaks undone (rich wraps at the console's width)."""
    return " ".join(result.output.split())


class StoppedError(Exception):
    pass


def _stop(done: int, total: int) -> None:
    """A progress callback that stops the run after its first page (an operator's Ctrl-C)."""
    raise StoppedError


def test_reencode_replaces_features_from_stored_text_and_records_the_fingerprint(
    url: str, monitored: Monitored, new_sae: NewSAE, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ServiceSettings(database_url=url, retention_interval_s=0)
    shipped = monitored.pipeline.sae.identity
    assert shipped != new_sae.fingerprint
    with TestClient(create_app(settings, [monitored]), base_url="https://testserver") as client:
        state = client.app.state.monitor  # type: ignore[attr-defined]
        with Session(state.engine) as session:
            ingest_key, read_key = (create_key(session, "acme", r) for r in ("ingest", "read"))
            session.commit()
        convs = {}
        for name, messages in (("scam", SCAM), ("plain", PLAIN), ("pii", PII)):
            convs[name] = f"{name}-{uuid.uuid4().hex[:6]}"
            r = client.post(
                "/v1/turns",
                headers={"Authorization": f"Bearer {ingest_key}"},
                json={"conversation_id": convs[name], "messages": messages},
            )
            assert r.status_code == 200, r.text
        world = World(url, state.sessions, {}, {"a": "acme"})
        assert set(world.fingerprints().values()) == {shipped}, "recorded at ingest"
        with world.sessions.begin() as s:  # one turn from before fingerprints were recorded
            s.execute(
                update(Turn)
                .where(Turn.conversation_id == convs["plain"])
                .values(sae_fingerprint=None)
            )
        before, decided = world.features(), world.decisions()
        assert any(d[3] for d in decided), "the scam turn fired and alerted"
        client.post("/ui/login", data={"key": read_key})
        page = client.get(f"/ui/conversations/{convs['scam']}").text
        assert f"SAE {shipped}" in page and "sae-mismatch" not in page, "read with the loaded SAE"

        r = _cli(url, monkeypatch, "--sae", str(new_sae.path), "--page-size", "2", "--json")
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        assert (report["reencoded"], report["already"], report["pages"]) == (3, 0, 2)
        assert report["fingerprint"] == new_sae.fingerprint and report["failed"] == 0
        assert set(world.fingerprints().values()) == {new_sae.fingerprint}
        after = world.features()
        with world.sessions() as s:
            pii_id = s.scalar(select(Turn.id).where(Turn.conversation_id == convs["pii"]))
        for turn_id, old in before.items():
            new = after[turn_id]
            if turn_id == pii_id:  # read from the stored, redacted text: no address in it
                assert "[EMAIL]" in "".join(new.tokens) and "jane" not in "".join(new.tokens)
                continue
            changed = np.mean([not np.array_equal(o, n) for o, n in _rows(old, new)])
            assert changed > 0.9, "other indices: the features were replaced"
            assert _renumbered(old, new, new_sae) > 0.99
        assert world.decisions() == decided, "verdicts and alerts are not changed"

        again = _cli(url, monkeypatch, "--sae", str(new_sae.path), "--json")
        assert again.exit_code == 0, again.output
        report = json.loads(again.stdout)
        assert (report["reencoded"], report["already"], report["pages"]) == (0, 3, 0)
        assert _same(world.features(), after)

        read = {"Authorization": f"Bearer {read_key}"}
        view = client.get(f"/v1/conversations/{convs['scam']}", headers=read).json()
        assert view["turns"][0]["sae_fingerprint"] == new_sae.fingerprint
        assert view["turns"][0]["sae_loaded"] == shipped, "the app still runs the shipped SAE"
        page = client.get(f"/ui/conversations/{convs['scam']}").text
        assert f"SAE {new_sae.fingerprint}" in page
        assert 'class="note sae-mismatch"' in page and f"not with the loaded {shipped}" in page


def _rows(old: StoredFeatures, new: StoredFeatures) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (
            old.indices[old.indptr[t] : old.indptr[t + 1]],
            new.indices[new.indptr[t] : new.indptr[t + 1]],
        )
        for t in range(len(old.tokens))
        if old.indptr[t + 1] > old.indptr[t]
    ]


def _same(a: dict[str, StoredFeatures], b: dict[str, StoredFeatures]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].tokens == b[k].tokens
        and np.array_equal(a[k].indices, b[k].indices)
        and np.array_equal(a[k].values, b[k].values)
        for k in a
    )


def test_an_interrupted_run_resumes_and_tenant_and_since_select(
    url: str, monitored: Monitored, new_sae: NewSAE, encoder: PageEncoder
) -> None:
    world = _world(url, monitored)
    shipped = monitored.pipeline.sae.identity
    scope = Scope(monitored.config.name)
    with pytest.raises(StoppedError):
        reencode(world.sessions, scope, new_sae.fingerprint, local_pages(encoder), 2, _stop)
    prints = world.fingerprints()
    first = [world.turns[n] for n in ("scam", "plain")]  # the oldest page
    assert [prints[t] for t in first] == [new_sae.fingerprint] * 2
    assert sorted(v for k, v in prints.items() if k not in first) == [shipped] * 3
    resumed = reencode(world.sessions, scope, new_sae.fingerprint, local_pages(encoder), 2)
    assert (resumed.reencoded, resumed.already, resumed.total) == (3, 2, 3)
    assert set(world.fingerprints().values()) == {new_sae.fingerprint}

    # Filters, on a fresh history: one tenant; then the turns since a time.
    world = _world(url, monitored)
    b = Scope(monitored.config.name, tenant=world.tenants["b"])
    assert reencode(world.sessions, b, new_sae.fingerprint, local_pages(encoder)).reencoded == 2
    prints = world.fingerprints()
    mine = {world.turns[n] for n in TURNS}
    done = {t for t in mine if prints[t] == new_sae.fingerprint}
    assert done == {world.turns["other"], world.turns["plain_b"]}
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    with world.sessions.begin() as s:
        s.execute(update(Turn).where(Turn.id == world.turns["scam"]).values(created_at=old))
    since = Scope(monitored.config.name, since=old + dt.timedelta(days=29))
    report = reencode(world.sessions, since, new_sae.fingerprint, local_pages(encoder))
    assert (report.reencoded, report.already) == (2, 5 + 2), "the first history's too"
    prints = world.fingerprints()
    assert prints[world.turns["scam"]] == shipped, "before --since: left as it was"
    assert {prints[t] for t in mine - {world.turns["scam"]}} == {new_sae.fingerprint}


def test_backtest_counts_turns_per_fingerprint_and_warns_of_another_sae(
    url: str,
    monitored: Monitored,
    new_sae: NewSAE,
    encoder: PageEncoder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = _world(url, monitored)
    shipped = monitored.pipeline.sae.identity
    candidate = candidate_from_catalog(monitored, "scam_email")
    flt = AuditFilter(world.tenants["a"])
    same = backtest(world.sessions, monitored, candidate, flt)
    assert same["fingerprints"] == {shipped: 3} and same["other_sae"] == 0
    assert same["sae_fingerprint"] == shipped
    with world.sessions.begin() as s:
        s.execute(update(Turn).where(Turn.id == world.turns["plain"]).values(sae_fingerprint=None))
    scope = Scope(monitored.config.name, tenant=world.tenants["a"])
    with pytest.raises(StoppedError):  # stopped after the first page: the scam turn only
        reencode(world.sessions, scope, new_sae.fingerprint, local_pages(encoder), 1, _stop)
    with caplog.at_level(logging.WARNING, logger="monitor.service.backtest"):
        mixed = backtest(world.sessions, monitored, candidate, flt)
    assert mixed["fingerprints"] == {new_sae.fingerprint: 1, shipped: 1, "unknown": 1}
    assert mixed["other_sae"] == 1
    assert any("1 of 3 turns were read with another SAE" in r.message for r in caplog.records)


def test_errors_before_any_work(
    url: str, monitored: Monitored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if url.startswith("sqlite"):  # nothing may be written, not even the schema
        untouched = f"sqlite:///{tmp_path / 'never.db'}"
        r = _cli(untouched, monkeypatch, "--sae", str(tmp_path / "missing"))
        assert r.exit_code == 2 and "no such SAE directory" in _said(r)
        assert not (tmp_path / "never.db").exists()
    world = _world(url, monitored)
    before, prints = world.features(), world.fingerprints()
    wrong = save_sae(placeholder_topk_sae(8, d_sae=16, k=2), tmp_path / "narrow")
    r = _cli(url, monkeypatch, "--sae", str(wrong))
    assert r.exit_code == 2 and "d_in is 8 but" in _said(r), r.output
    r = _cli(url, monkeypatch, "--sae", str(tmp_path / "missing"))
    assert r.exit_code == 2 and "no such SAE directory" in _said(r)
    r = _cli(url, monkeypatch, "--sae", str(wrong), "--since", "yesterday")
    assert r.exit_code == 2 and "--since: 'yesterday' is not an ISO date" in _said(r)
    r = _cli(url, monkeypatch, "--sae", str(wrong), "--workers", "2")
    assert r.exit_code == 2 and "go with --ray" in _said(r)
    assert _same(world.features(), before) and world.fingerprints() == prints


@pytest.mark.ray
def test_ray_actors_store_what_the_local_run_stores(
    monitored: Monitored, new_sae: NewSAE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    local = _world(f"sqlite:///{tmp_path / 'local.db'}", monitored)
    on_ray = _world(f"sqlite:///{tmp_path / 'ray.db'}", monitored)
    sae = str(new_sae.path)
    r = _cli(on_ray.url, monkeypatch, "--sae", sae, "--ray", "--address", "127.0.0.1:9")
    assert r.exit_code == 2 and "nothing answers at the Ray address 127.0.0.1:9" in _said(r)
    r = _cli(local.url, monkeypatch, "--sae", sae, "--page-size", "2", "--json")
    assert r.exit_code == 0, r.output
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        r = _cli(on_ray.url, monkeypatch, "--sae", sae, "--ray", "--workers", "3")
        assert r.exit_code == 2 and "but the local cluster has 2" in _said(r), r.output
        r = _cli(
            on_ray.url,
            monkeypatch,
            "--sae",
            sae,
            "--ray",
            "--workers",
            "1",
            "--page-size",
            "2",
            "--json",
        )
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["reencoded"] == len(TURNS)
    finally:
        ray.shutdown()
    assert set(on_ray.fingerprints().values()) == {new_sae.fingerprint}
    mine, theirs = local.features(), on_ray.features()
    for name in TURNS:
        a, b = mine[local.turns[name]], theirs[on_ray.turns[name]]
        assert a.tokens == b.tokens
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
        # Values are stored in fp16: the actor's torch (one thread) sums in another order than
        # the local run's, and a value may round to the neighbouring fp16 number (one ulp).
        ulp = np.spacing(np.abs(b.values).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(a.values - b.values) <= ulp), np.abs(a.values - b.values).max()


def test_migration_0008_leaves_turns_stored_before_it_unknown(url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from monitor.service.db import Base

    engine = make_engine(url)
    try:
        upgrade(engine, "0007")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO turns (id, tenant, conversation_id, pipeline, created_at, "
                    "messages, metadata, n_tokens, dropped) "
                    "VALUES ('t1', 'a', 'c', 'p', '2026-01-01', '[]', '{}', 1, 0)"
                )
            )
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT sae_fingerprint FROM turns")).all() == [(None,)]
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
