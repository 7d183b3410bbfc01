"""The SAELens on-disk format: ``cfg.json`` plus ``sae_weights.safetensors``.

Tensors: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
and ``threshold [d_sae]`` for JumpReLU. Users bring their own SAEs in this format.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from monitor.sae.base import SAEError, SparseAutoencoder
from monitor.sae.registry import ARCHITECTURES

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

# Older SAELens configs name the activation instead of the architecture.
_LEGACY_ACTIVATION = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}


def load_sae(path: str | Path, expected_d_in: int | None = None) -> SparseAutoencoder:
    """Load an SAE directory; SAEError names the file and what is wrong with it."""
    directory = Path(path)
    if not directory.is_dir():
        raise SAEError(f"{directory}: no such SAE directory")
    cfg_path = directory / CFG_FILE
    weights_path = directory / WEIGHTS_FILE
    cfg = _read_cfg(cfg_path)
    arch = cfg.get("architecture") or _LEGACY_ACTIVATION.get(str(cfg.get("activation_fn_str")))
    if arch not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise SAEError(f"{cfg_path}: architecture {arch!r} is not one of {known}")
    for name in ("d_in", "d_sae"):
        if not isinstance(cfg.get(name), int) or cfg[name] <= 0:
            raise SAEError(
                f"{cfg_path}: field {name!r} must be a positive integer, got {cfg.get(name)!r}"
            )
    if expected_d_in is not None and cfg["d_in"] != expected_d_in:
        raise SAEError(
            f"{cfg_path}: d_in is {cfg['d_in']} but the model's residual stream is "
            f"{expected_d_in} wide; this SAE was made for another model"
        )
    if not weights_path.is_file():
        raise SAEError(f"{weights_path}: missing")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise SAEError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    cls = ARCHITECTURES[arch]
    missing = [n for n in cls.tensor_names if n not in tensors]
    if missing:
        raise SAEError(
            f"{weights_path}: tensor(s) {', '.join(missing)} missing for architecture {arch!r} "
            f"(the file has {', '.join(sorted(tensors)) or 'none'})"
        )
    try:
        sae = cls({**cfg, "architecture": arch}, tensors)
    except SAEError as exc:
        raise SAEError(f"{directory}: {exc}") from exc
    sae.directory = directory
    return sae


def save_sae(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write ``sae`` in SAELens format, tensors exactly as stored; each file lands whole or not."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {**sae.cfg, "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae}
    cfg.setdefault("dtype", str(sae.stored["W_enc"].dtype).removeprefix("torch."))
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(sae.stored, p))
    _atomic_write(
        directory / CFG_FILE,
        lambda p: Path(p).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n"),
    )
    return directory


def _read_cfg(cfg_path: Path) -> dict[str, Any]:
    if not cfg_path.is_file():
        raise SAEError(f"{cfg_path}: missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise SAEError(f"{cfg_path}: expected a JSON object")
    return cfg


def _atomic_write(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        Path(tmp).chmod(0o644)  # mkstemp (and safetensors) make it private; it is to be shared
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
