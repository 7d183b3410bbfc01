"""Deployment as code: the compose file, the Kubernetes manifests, the Dockerfile, and the
replayer's remote mode against a real sidecar.

Nothing here builds an image or starts a container (no Docker engine is needed): compose is
checked by ``docker-compose config``, the manifests against the Kubernetes API schemas bundled
with ``kubernetes-validate`` (offline, strict), the Dockerfile as text.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from typer.testing import CliRunner

from monitor.cli import app as cli
from monitor.localservices import ThreadedServer, free_port
from monitor.service.settings import ServiceSettings, webhook_secret_bytes

if TYPE_CHECKING:
    from monitor.service.monitored import Monitored

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
CLI = str(Path(sys.executable).parent / "safety-monitor")
K8S_VERSION = "1.30.0"
SIDECARS = ("db-migrate", "sidecar-api", "sidecar-worker", "replayer")
UID = 10001
# The webhook secret of the templates (deploy/.env.example, the k8s Secret), decoded.
PLACEHOLDER_KEY = base64.b64decode("REPLACEMEwithREPLACEMEwithREPLACEME0")


def cli_accepts(args: list[str]) -> None:
    """``args`` name a real command with real options (parsed, not run: ``--help`` stops it)."""
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, f"safety-monitor {shlex.join(args)}: {result.output}"


# --- compose ------------------------------------------------------------------------------


def compose_config(env_file: Path, *extra: str) -> dict[str, Any]:
    """``docker-compose config`` of deploy/compose.yaml, parsed; fails the test if it fails."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/system-deps.sh installs it)")
    # Only PATH and HOME: variables of the calling shell must not leak into the defaults.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    cmd = [exe, "-f", str(COMPOSE), "--env-file", str(env_file), *extra, "config"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    doc: dict[str, Any] = yaml.safe_load(proc.stdout)
    return doc


@pytest.fixture(scope="module")
def no_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty env file: compose on its defaults, as on a host with no deploy/.env."""
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def compose(no_env: Path) -> dict[str, Any]:
    services: dict[str, Any] = compose_config(no_env, "--profile", "replay")["services"]
    return services


def test_compose_is_valid_without_a_dot_env_and_with_the_example(no_env: Path) -> None:
    plain = compose_config(no_env)["services"]
    assert set(plain) >= {
        "postgres",
        "kafka",
        "kafka-init",
        "db-migrate",
        "sidecar-api",
        "sidecar-worker",
        "prometheus",
        "grafana",
        "replayer",
    }
    assert plain["replayer"]["profiles"] == ["replay"], "the replayer is optional"
    example = compose_config(DEPLOY / ".env.example")["services"]
    env = example["sidecar-api"]["environment"]
    assert ":REPLACE_ME-long-random-string@postgres:5432/" in env["SAFETY_MONITOR_DATABASE_URL"]
    assert example["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("REPLACE_ME")


def test_compose_services_images_and_commands(compose: dict[str, Any]) -> None:
    assert compose["kafka"]["image"].startswith("apache/kafka:")
    assert compose["postgres"]["image"].startswith("postgres:")
    assert compose["grafana"]["image"].startswith("grafana/grafana")
    assert compose["prometheus"]["image"].startswith("prom/prometheus:")
    images = {compose[s]["image"] for s in SIDECARS}
    assert len(images) == 1, "one sidecar image for the API, the workers and the one-shots"
    for name in SIDECARS:
        assert compose[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert Path(compose[name]["build"]["context"]) == ROOT
    assert compose["db-migrate"]["command"] == ["db", "upgrade"]
    assert compose["sidecar-api"]["command"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert compose["sidecar-worker"]["command"] == ["worker", "--host", "0.0.0.0", "--port", "8001"]
    for name in ("db-migrate", "sidecar-api", "sidecar-worker"):
        cli_accepts(compose[name]["command"])
    script = compose["replayer"]["command"][0]
    assert "safety-monitor replay --url http://sidecar-api:8000" in script
    cli_accepts(["replay", "--url", "http://sidecar-api:8000", "--api-key", "k", "--wait", "600"])


def test_compose_wiring_health_and_order(compose: dict[str, Any]) -> None:
    def needs(service: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in compose[service]["depends_on"].items()}

    assert needs("db-migrate") == {"postgres": "service_healthy"}
    for name in ("sidecar-api", "sidecar-worker"):
        assert needs(name) == {
            "db-migrate": "service_completed_successfully",
            "kafka-init": "service_completed_successfully",
        }
    assert needs("kafka-init") == {"kafka": "service_healthy"}
    assert needs("replayer") == {"sidecar-api": "service_healthy"}
    for name in ("postgres", "kafka", "sidecar-api"):
        assert compose[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert "/readyz" in " ".join(compose["sidecar-api"]["healthcheck"]["test"])
    # The image's HEALTHCHECK asks the API's port, the worker's its own; the one-shots have none.
    worker_check = " ".join(compose["sidecar-worker"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8001/readyz" in worker_check
    for name in ("db-migrate", "replayer"):
        assert compose[name]["healthcheck"]["test"] == ["NONE"]
    # Workers scale with --scale: no fixed name, no host port.
    worker = compose["sidecar-worker"]
    assert "container_name" not in worker and "ports" not in worker
    for service in compose.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"published beyond loopback: {port}"


def test_compose_kafka_runs_kraft_and_the_sidecar_finds_it(compose: dict[str, Any]) -> None:
    kafka = compose["kafka"]["environment"]
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in k for k in kafka), "KRaft: no ZooKeeper"
    assert "INTERNAL://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    for name in SIDECARS:
        assert compose[name]["environment"]["SAFETY_MONITOR_KAFKA_BOOTSTRAP"] == "kafka:9092"
    topics = compose["kafka-init"]["command"][0]
    for topic in ("llm.traffic", "llm.traffic.dlq", "safety.alerts"):
        assert f"--topic {topic} " in topics


def test_compose_grafana_and_prometheus_mounts(compose: dict[str, Any]) -> None:
    grafana = {v.rsplit(":", 2)[1]: v.split(":")[0] for v in compose["grafana"]["volumes"]}
    assert Path(grafana["/etc/grafana/provisioning"]) == ROOT / "dashboards" / "provisioning"
    assert Path(grafana["/var/lib/grafana/dashboards"]) == ROOT / "dashboards"
    # Every $VAR the datasource provisioning reads is set, and Grafana reads with its own role.
    env = compose["grafana"]["environment"]
    for path in sorted((ROOT / "dashboards" / "provisioning").rglob("*.yaml")):
        wanted = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)\}?", path.read_text()))
        assert wanted <= set(env), f"{path.name} reads unset {sorted(wanted - set(env))}"
        for provider in yaml.safe_load(path.read_text()).get("providers", []):
            assert provider["options"]["path"] in grafana, "the dashboards folder is mounted"
    assert env["POSTGRES_USER"] == "grafana_reader" and env["POSTGRES_HOST"] == "postgres"
    init = {v.rsplit(":", 2)[1]: v.split(":")[0] for v in compose["postgres"]["volumes"]}
    script = init["/docker-entrypoint-initdb.d/10-grafana-reader.sh"]
    assert Path(script) == DEPLOY / "postgres" / "grafana-reader.sh"
    assert "-h 127.0.0.1" in compose["postgres"]["healthcheck"]["test"][1], "TCP, not the socket"
    prom = {v.rsplit(":", 2)[1]: v.split(":")[0] for v in compose["prometheus"]["volumes"]}
    assert Path(prom["/etc/prometheus/prometheus.yml"]) == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "safety-monitor")
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["names"] == ["sidecar-api"]
    assert job["dns_sd_configs"][0]["port"] == 8000
    promtool = shutil.which("promtool")
    if promtool:
        check = [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")]
        proc = subprocess.run(check, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def settings_file_keys(text: str) -> set[str]:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return set(doc)


def test_compose_settings_parse_into_service_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = DEPLOY / "config" / "monitor.yaml"
    # The settings ignore unknown keys, so a misspelt one would pass silently: name them all.
    assert settings_file_keys(config.read_text()) <= set(ServiceSettings.model_fields)
    mounts = {v.rsplit(":", 2)[1]: v.split(":")[0] for v in compose["sidecar-api"]["volumes"]}
    env = compose_config(DEPLOY / ".env.example")["services"]["sidecar-api"]
    for name, value in env["environment"].items():
        monkeypatch.setenv(name, mounts.get(value, value))
    s = ServiceSettings()
    assert s.config_file == config
    assert s.kafka_bootstrap == "kafka:9092"
    assert s.database_url and s.database_url.startswith("postgresql+psycopg://")
    assert [webhook_secret_bytes(w.secrets[0]) for w in s.webhooks] == [PLACEHOLDER_KEY]
    assert [p.model for p in s.resolved_pipelines()] == ["smollm2-135m-instruct"]


@pytest.mark.integration
def test_grafana_reader_role_can_read_and_nothing_else(pg_url: str) -> None:
    """deploy/postgres/grafana-reader.sh, run as the image runs it, against a real PostgreSQL."""
    import uuid

    import psycopg
    from sqlalchemy import create_engine, make_url

    from monitor.service.db import upgrade

    url = make_url(pg_url)
    suffix = uuid.uuid4().hex[:8]
    db, reader, password = f"sm_grafana_{suffix}", f"grafana_reader_{suffix}", "reader-pw-1"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        env = {
            **os.environ,
            "PGHOST": url.host or "127.0.0.1",
            "PGPORT": str(url.port or 5432),
            "PGPASSWORD": url.password or "",
            "POSTGRES_USER": url.username or "postgres",
            "POSTGRES_DB": db,
            "GRAFANA_DB_USER": reader,
            "GRAFANA_DB_PASSWORD": password,
        }
        script = DEPLOY / "postgres" / "grafana-reader.sh"
        proc = subprocess.run(
            ["sh", str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        owner = create_engine(url.set(database=db))
        upgrade(owner)  # the tables arrive after the role, as with db-migrate
        owner.dispose()
        as_reader = url.set(
            drivername="postgresql", database=db, username=reader, password=password
        )
        with psycopg.connect(as_reader.render_as_string(hide_password=False)) as conn:
            assert conn.execute("SELECT count(*) FROM alerts").fetchone() == (0,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM turns")
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{reader}"')


# --- Kubernetes ---------------------------------------------------------------------------


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} manifests"
    return found[0]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for _, d in manifests()
        if d["kind"] in ("Deployment", "Job")
    ]


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: p.name)
def test_manifest_passes_the_kubernetes_schema(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} {where}: {exc.message}")


def test_the_schema_check_is_strict() -> None:
    doc = find("Deployment", "safety-monitor-api")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="httpGett"):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_api_probes_resources_and_service() -> None:
    api = find("Deployment", "safety-monitor-api")
    pod = api["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "the model loads first"
    service = find("Service", "safety-monitor-api")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_worker_is_scaled_by_an_hpa() -> None:
    worker = find("Deployment", "safety-monitor-worker")
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"
    assert worker["spec"]["replicas"] >= 2
    hpa = find("HorizontalPodAutoscaler", "safety-monitor-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "safety-monitor-worker",
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_every_pod_requests_resources_runs_non_root_and_uses_real_commands() -> None:
    images = set()
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == UID, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            for resource in ("cpu", "memory"):
                assert resource in c["resources"]["requests"], f"{name}: {resource} request"
                assert resource in c["resources"]["limits"], f"{name}: {resource} limit"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{name}: /tmp"
            cli_accepts(c["args"])
            images.add(c["image"])
    assert len(images) == 1, images
    job = find("Job", "safety-monitor-db-upgrade")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]


def test_secrets_are_placeholders_and_reach_the_pods() -> None:
    secrets = [(p, d) for p, d in manifests() if d["kind"] == "Secret"]
    assert {d["metadata"]["name"] for _, d in secrets} == {
        "safety-monitor-secrets",
        "safety-monitor-client-key",
    }
    for path, doc in secrets:
        assert path.parent.name == "secret", "kept out of `kubectl apply -f deploy/k8s/`"
        for key, value in doc["stringData"].items():
            assert re.search("REPLACE_?ME", value), f"{key} must be a marked placeholder"
    values = find("Secret", "safety-monitor-secrets")["stringData"]
    assert set(values) == {"SAFETY_MONITOR_DATABASE_URL", "SAFETY_MONITOR_WEBHOOKS"}
    for name in ("safety-monitor-api", "safety-monitor-worker"):
        (c,) = find("Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "safety-monitor-secrets"}} in c["envFrom"]


def test_configmap_settings_parse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = find("ConfigMap", "safety-monitor-config")["data"]["monitor.yaml"]
    assert settings_file_keys(text) <= set(ServiceSettings.model_fields)
    path = tmp_path / "monitor.yaml"
    path.write_text(text)
    secret = find("Secret", "safety-monitor-secrets")["stringData"]
    for name in ("SAFETY_MONITOR_DATABASE_URL", "SAFETY_MONITOR_KAFKA_BOOTSTRAP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAFETY_MONITOR_CONFIG_FILE", str(path))
    monkeypatch.setenv("SAFETY_MONITOR_WEBHOOKS", secret["SAFETY_MONITOR_WEBHOOKS"])
    s = ServiceSettings()
    assert s.kafka_bootstrap and s.traffic_topic == "llm.traffic"
    assert webhook_secret_bytes(s.webhooks[0].secrets[0]) == PLACEHOLDER_KEY


# --- Dockerfile ---------------------------------------------------------------------------


def stages(dockerfile: str) -> list[str]:
    return re.split(r"(?m)^FROM ", dockerfile)[1:]


def test_dockerfile_installs_torch_first_and_runs_as_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    body = "\n".join(lines)
    torch_at = body.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"')
    project_at = body.index('pip install ".${EXTRAS}" -c constraints.txt')
    assert torch_at < project_at, "torch goes in before the project"
    make_torch = re.search(r"(?m)^TORCH_VERSION \?= (\S+)", (ROOT / "Makefile").read_text())
    assert make_torch and f"ARG TORCH_VERSION={make_torch.group(1)}" in body
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in body
    assert "safety-monitor models fetch" in body, "the model is fetched at build time"
    all_stages = stages(body)
    assert len(all_stages) >= 2, "multi-stage"
    final = all_stages[-1]
    user = re.findall(r"(?m)^USER (\S+)", final)
    assert user and user[-1].split(":")[0] in ("${UID}", str(UID))
    assert f"ARG UID={UID}" in final, "the UID the Kubernetes manifests run as"
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert 'ENTRYPOINT ["safety-monitor"]' in final
    cmd = re.findall(r"(?m)^CMD (\[.*\])$", final)  # the last one; HEALTHCHECK has its own
    cli_accepts(json.loads(cmd[-1]))
    assert not re.search(r"PASSWORD|SECRET|API_KEY|DATABASE_URL|WEBHOOKS", body), "no secrets"
    ignore = [
        ln
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert ignore[0] == "*", "the build context is an allow-list"
    assert {"!pyproject.toml", "!README.md", "!constraints.txt", "!monitor/"} <= set(ignore)
    assert "!detectors/" in ignore


# --- the replayer against a running sidecar -----------------------------------------------


def replay_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAFETY_MONITOR_REPLAY")}
    return subprocess.run(
        [CLI, "replay", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**base, "COLUMNS": "200", **(env or {})},
        check=False,
    )


def test_replay_url_errors_are_clear_and_exit_non_zero() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = replay_cli("--url", url, "--api-key", "smk_x", "--wait", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{url} was not ready within 1 s (ConnectError" in proc.stderr
    assert time.monotonic() - started < 60, "the wait is bounded"
    proc = replay_cli("--url", "ftp://example.org", "--api-key", "smk_x")
    assert proc.returncode == 2 and "--url must be an http:// or https:// address" in proc.stderr
    proc = replay_cli("--url", url)
    assert proc.returncode == 2 and "--url needs --api-key" in proc.stderr


@pytest.fixture
def sidecar(tmp_path: Path, monitored: Monitored) -> Iterator[tuple[str, Any]]:
    """The real API on 127.0.0.1 in this process, over SQLite; yields its URL and app state."""

    from monitor.service.app import create_app

    settings = ServiceSettings(database_url=f"sqlite:///{tmp_path / 'm.db'}", kafka_bootstrap=None)
    app = create_app(settings, [monitored])
    with ThreadedServer(app) as server:
        yield server.url, app.state.monitor


@pytest.mark.slow
def test_replay_into_a_running_sidecar_stores_turns_and_prints_alerts(
    sidecar: tuple[str, Any], tmp_path: Path
) -> None:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from monitor.service.db import Alert, ApiKey, Turn
    from monitor.service.keys import create_key

    url, state = sidecar
    with Session(state.engine) as session:
        key = create_key(session, "replay-test", "admin")
        reader = create_key(session, "replay-test", "read")
        session.commit()

    def count(model: Any) -> int:
        with Session(state.engine) as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)

    proc = replay_cli("--url", url + "/", "--once", env={"SAFETY_MONITOR_REPLAY_API_KEY": key})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alerts from 17 replayed turns" in proc.stdout
    assert "scam_email" in proc.stdout and "sycophancy" in proc.stdout
    with Session(state.engine) as session:
        tenants = session.scalars(select(Turn.tenant).distinct()).all()
        detectors = set(session.scalars(select(Alert.detector)).all())
    assert count(Turn) == 17 and tenants == ["replay-test"]
    assert {"scam_email", "sycophancy"} <= detectors
    assert count(ApiKey) == 2, "the remote mode creates no key"

    refused = replay_cli("--url", url, "--api-key", "smk_not-a-key", "--wait", "5")
    assert refused.returncode == 2 and "refused the API key (401" in refused.stderr
    # A read-only key passes the check but may not send turns: each refusal is shown, exit 1.
    one = tmp_path / "one.jsonl"
    hello = {"conversation_id": "c1", "messages": [{"role": "user", "content": "Hello"}]}
    one.write_text(json.dumps(hello) + "\n")
    partial = replay_cli("--url", url, "--api-key", reader, "--file", str(one))
    assert partial.returncode == 1 and "turn refused: 403" in partial.stderr
    assert count(Turn) == 17
