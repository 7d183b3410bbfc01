"""Service settings: environment first, then the YAML file; bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from monitor.service.settings import ServiceSettings


def test_yaml_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(
        "database_url: sqlite:///from-file.db\n"
        "kafka_bootstrap: 10.0.0.1:9092\n"
        "pipelines:\n"
        "  - {name: main, model: smollm2-135m-instruct, layer: 15}\n"
        "  - {name: gemma, model: gemma3-270m, layer: 9, catalog: [rules/]}\n"
        "webhooks:\n"
        "  - {name: ops, url: 'https://hooks.example/x', min_severity: high,\n"
        "     secrets: [whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3]}\n"
    )
    monkeypatch.setenv("SAFETY_MONITOR_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("SAFETY_MONITOR_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    s = ServiceSettings()
    assert s.database_url == "sqlite:///from-file.db"
    assert s.kafka_bootstrap == "127.0.0.1:19092", "the environment wins over the file"
    assert [p.name for p in s.resolved_pipelines()] == ["main", "gemma"]
    assert s.pipelines[1].catalog == [Path("rules/")]
    assert s.webhooks[0].min_severity == "high"


def test_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP", "CONFIG_FILE"):
        monkeypatch.delenv(f"SAFETY_MONITOR_{name}", raising=False)
    monkeypatch.setenv("SAFETY_MONITOR_DATA_DIR", str(tmp_path / "data"))
    s = ServiceSettings()
    assert s.kafka_bootstrap is None and s.webhooks == []
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'data' / 'monitor.db'}"
    assert [p.name for p in s.resolved_pipelines()] == ["smollm2-135m-instruct"]


def test_bad_values_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("pipelines:\n  - {name: a}\n  - {name: a}\n")
    monkeypatch.setenv("SAFETY_MONITOR_CONFIG_FILE", str(cfg))
    with pytest.raises(ValidationError, match="pipeline names must be unique"):
        ServiceSettings()
    cfg.write_text("webhooks:\n  - {name: x, url: 'ftp://no', secrets: [short]}\n")
    with pytest.raises(ValidationError) as info:
        ServiceSettings()
    fields = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert fields == {"webhooks.0.url", "webhooks.0.secrets"}
    cfg.write_text("just a string\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        ServiceSettings()
