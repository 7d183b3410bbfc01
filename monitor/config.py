"""Settings, read once from the environment (prefix ``SAFETY_MONITOR_``) and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "safety-monitor"


DEFAULT_MAX_INPUT_TOKENS = 8192


class Settings(BaseSettings):
    """Everything the pipeline needs to know; the CLI overrides single fields from its options."""

    model_config = SettingsConfigDict(env_prefix="SAFETY_MONITOR_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Fetched model packages and converted checkpoints live here.",
    )
    model: str = Field(
        default="smollm2-135m-instruct",
        description="Built-in model name, a local Hugging Face model directory, or a hub name "
        "already in the local cache.",
    )
    layer: int | None = Field(
        default=None,
        ge=1,
        description="Residual stream after this many decoder layers "
        "(default: the SAE's layer, else the model's).",
    )
    sae: Path | None = Field(default=None, description="SAELens-format SAE directory.")
    sae_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="What the SAE computes in on CUDA (bfloat16/float16 halve its memory); "
        "always float32 on CPU.",
    )
    max_tokens: int = Field(
        default=512,
        ge=8,
        description="Tokens per forward pass; a longer input is read in overlapping windows.",
    )
    max_input_tokens: int = Field(
        default=DEFAULT_MAX_INPUT_TOKENS,
        ge=8,
        description="The most of one input that is read; a longer input keeps its most recent "
        "tokens (the service refuses it instead).",
    )
    batch_size: int = Field(default=8, ge=1, description="Sequences per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = "auto"


def resolve_device(device: str) -> str:
    """Map ``auto`` to ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but torch sees no GPU "
            f"(torch {torch.__version__}); install a CUDA build of torch or use --device cpu"
        )
    return device
