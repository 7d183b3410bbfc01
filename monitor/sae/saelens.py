"""The SAELens on-disk format: ``cfg.json`` plus ``sae_weights.safetensors``.

Tensors: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
and ``threshold [d_sae]`` for JumpReLU. Users bring their own SAEs in this format; any other
tensor in the file is refused rather than left out of the maths.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from monitor.sae.base import SAEError, SparseAutoencoder
from monitor.sae.normalize import SCALE_FIELD
from monitor.sae.registry import ARCHITECTURES, architecture_of

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens checkpoints keep the input scale of ``expected_average_only_in`` here, unfolded
SCALER_FILE = "activation_scaler.json"
# SAELens' per-feature decoder scale of fine-tuning runs; all ones (a no-op) is dropped, as there
_FINETUNING_SCALE = ("scaling_factor", "finetuning_scaling_factor")


def load_sae(path: str | Path, expected_d_in: int | None = None) -> SparseAutoencoder:
    """Load an SAE directory; SAEError names the file and what is wrong with it."""
    directory = Path(path)
    if not directory.is_dir():
        raise SAEError(f"{directory}: no such SAE directory")
    cfg_path = directory / CFG_FILE
    weights_path = directory / WEIGHTS_FILE
    cfg = _with_scaler(_read_cfg(cfg_path), directory / SCALER_FILE)
    arch = architecture_of(cfg, str(cfg_path))
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
    _refuse_unused(tensors, cls, weights_path)
    try:
        sae = cls({**cfg, "architecture": arch}, tensors, source=str(cfg_path))
    except SAEError as exc:
        message = str(exc)
        prefixed = message if message.startswith(str(directory)) else f"{directory}: {message}"
        raise SAEError(prefixed) from exc
    sae.directory = directory
    return sae


def _refuse_unused(
    tensors: dict[str, torch.Tensor], cls: type[SparseAutoencoder], weights_path: Path
) -> None:
    """Every tensor in the file is used, or the SAE is refused (all-ones fine-tuning scales,
    a no-op, are dropped)."""
    for name in _FINETUNING_SCALE:
        if name in tensors and bool((tensors[name] == 1).all()):
            del tensors[name]
    unused = sorted(set(tensors) - set(cls.tensor_names))
    if unused:
        raise SAEError(
            f"{weights_path}: tensor(s) {', '.join(unused)} are not part of a {cls.architecture} "
            f"SAE ({', '.join(cls.tensor_names)}); refused rather than ignored, as they may "
            "change what it computes"
        )


def _with_scaler(cfg: dict[str, Any], scaler_path: Path) -> dict[str, Any]:
    """``cfg`` with the scale of a SAELens checkpoint's ``activation_scaler.json`` (if it has
    one and the cfg still scales its input by it) as ``norm_scaling_factor``."""
    wants_scale = cfg.get("normalize_activations") in ("expected_average_only_in", True)
    if not wants_scale or cfg.get(SCALE_FIELD) is not None or not scaler_path.is_file():
        return cfg
    try:
        scale = json.loads(scaler_path.read_text()).get("scaling_factor")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise SAEError(f"{scaler_path}: not a JSON object with 'scaling_factor' ({exc})") from exc
    return cfg if scale is None else {**cfg, SCALE_FIELD: scale}


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
