"""Unknown configuration keys are refused at start, naming the key and the nearest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from monitor.cli import app as cli
from monitor.service.settings import ServiceSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP", "CONFIG_FILE"):
        monkeypatch.delenv(f"SAFETY_MONITOR_{name}", raising=False)
    monkeypatch.setenv("SAFETY_MONITOR_DATA_DIR", str(tmp_path / "data"))


def test_unknown_key_in_the_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text("retention_dayz: 7\n")
    monkeypatch.setenv("SAFETY_MONITOR_CONFIG_FILE", str(cfg))
    with pytest.raises(ValueError, match=r"'retention_dayz'; did you mean 'retention_days'\?"):
        ServiceSettings()
    cfg.write_text("pipelines:\n  - {name: main, layr: 15}\n")
    with pytest.raises(ValidationError, match=r"unknown key 'layr'; did you mean 'layer'\?"):
        ServiceSettings()
    cfg.write_text(
        "webhooks:\n  - {name: ops, url: 'https://x.example',\n"
        "     secrets: [whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3],\n"
        "     min_severty: high}\n"
    )
    with pytest.raises(ValidationError, match=r"'min_severty'; did you mean 'min_severity'\?"):
        ServiceSettings()


def test_unknown_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETY_MONITOR_RETENTION_DAYZ", "7")
    with pytest.raises(
        ValueError, match=r"SAFETY_MONITOR_RETENTION_DAYZ.*SAFETY_MONITOR_RETENTION_DAYS"
    ):
        ServiceSettings()
    monkeypatch.delenv("SAFETY_MONITOR_RETENTION_DAYZ")
    # The pipeline's own variables and the replay key share the prefix: they are not typos.
    monkeypatch.setenv("SAFETY_MONITOR_CACHE_DIR", "/tmp/cache")
    monkeypatch.setenv("SAFETY_MONITOR_REPLAY_API_KEY", "smk_x")
    monkeypatch.setenv("SAFETY_MONITOR_RETENTION_DAYS", "7")
    assert ServiceSettings().retention_days == 7


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValidationError, match="retention_dayz"):
        ServiceSettings(retention_dayz=7)  # type: ignore[call-arg]


def test_the_service_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text("retention_dayz: 7\n")
    monkeypatch.setenv("SAFETY_MONITOR_CONFIG_FILE", str(cfg))
    # serve last: where a typo went unnoticed it would start serving.
    for command in (["worker"], ["db", "upgrade"], ["serve"]):
        r = CliRunner().invoke(cli, command)
        assert r.exit_code == 2, (command, r.output)
        assert "retention_dayz" in r.output and "retention_days" in r.output
    assert not (tmp_path / "data").exists(), "nothing was started or created"
