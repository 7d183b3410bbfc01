"""Architecture name (as written in cfg.json) to class, and which one a cfg means."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.sae.base import SAEError, SparseAutoencoder
from monitor.sae.jumprelu import JumpReLUSAE
from monitor.sae.standard import StandardSAE
from monitor.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (StandardSAE, TopKSAE, JumpReLUSAE)
}

# SAELens before v6 named the activation too (``activation_fn_str``, renamed ``activation_fn``)
# and defaulted the architecture to "standard"; "standard" with a topk activation is a TopK SAE.
_ACTIVATION_FIELDS = ("activation_fn_str", "activation_fn")
_ACTIVATIONS = {
    "relu": ("standard", "jumprelu"),
    "topk": ("topk", "standard"),
    "jumprelu": ("jumprelu",),
}


def architecture_of(cfg: Mapping[str, Any], source: str) -> str:
    """The architecture ``cfg`` describes, from its ``architecture`` and, in older configs, its
    activation; SAEError (naming ``source``, the field and value) for any it cannot honour."""
    arch = cfg.get("architecture")
    field, activation = next(
        ((f, cfg[f]) for f in _ACTIVATION_FIELDS if cfg.get(f) is not None), ("", None)
    )
    if activation is not None:
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise SAEError(
                f"{source}: field {field!r} is {activation!r}, not one of {', '.join(_ACTIVATIONS)}"
            )
        if arch is None:
            arch = "jumprelu" if activation == "jumprelu" else "standard"
        if arch not in _ACTIVATIONS[activation]:
            raise SAEError(
                f"{source}: field {field!r} is {activation!r} but architecture is {arch!r}; "
                "they disagree"
            )
        if activation == "topk":
            arch = "topk"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    allowed = {"k"} if arch == "topk" else set()
    if not isinstance(kwargs, Mapping) or set(kwargs) - allowed:
        raise SAEError(
            f"{source}: field 'activation_fn_kwargs' is {kwargs!r}; only k (for topk) is understood"
        )
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise SAEError(f"{source}: architecture {arch!r} is not one of {known}")
    return arch
