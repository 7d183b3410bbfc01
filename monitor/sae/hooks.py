"""Which residual-stream layer an SAE was trained on, read from the hook its cfg.json names.

The monitor numbers layers as Hugging Face's ``hidden_states`` does: layer L is the residual
stream after L decoder layers, and it reads L >= 1 only (0 is the embeddings). The names map
onto that count:

- TransformerLens ``blocks.N.hook_resid_post`` is the output of block N: layer N + 1;
  ``blocks.N.hook_resid_pre`` is its input: layer N (``blocks.0.hook_resid_pre`` is the
  embeddings, refused);
- Hugging Face module paths ``model.layers.N`` (or ``layers.N``, ``transformer.h.N``) are read
  at the module's output: layer N + 1.

Any other hook (attention ``hook_z``, MLP or attention outputs, ``hook_resid_mid``) is not a
residual stream the monitor taps, so it is refused rather than read at the wrong place.

SAELens up to v5 writes ``hook_name`` and ``hook_layer`` at the top level (this project's own
SAEs too); v6 writes them under ``metadata``, usually without ``hook_layer``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from monitor.sae.errors import SAEError

_TRANSFORMER_LENS = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")
_HF_MODULE = re.compile(r"(?:[A-Za-z_]\w*\.)*(?:layers|h)\.(\d+)")
# (name, older name); the older names come from SAELens before 1.0
_NAME = ("hook_name", "hook_point")
_BLOCK = ("hook_layer", "hook_point_layer")
_HEAD = ("hook_head_index", "hook_point_head_index")
_META = ("metadata", "meta")  # v6, and its release candidates


def hook_layer(cfg: Mapping[str, Any], source: str) -> int | None:
    """The layer (>= 1) the hook in ``cfg`` reads; None when the cfg names no hook at all.

    ``source`` (the cfg file) starts every SAEError, which names the field and its value.
    """
    name_field, name = _field(cfg, _NAME, source)
    block_field, block = _field(cfg, _BLOCK, source)
    head_field, head = _field(cfg, _HEAD, source)
    if head is not None:
        raise SAEError(
            f"{source}: field {head_field!r} is {head!r}: an SAE on one attention head is not "
            "on the residual stream, which is all the monitor reads"
        )
    if name is None:
        if block is None:
            return None
        raise SAEError(
            f"{source}: field {block_field!r} is {block!r} but there is no hook_name, so "
            "resid_pre and resid_post cannot be told apart; add e.g. "
            f'"hook_name": "blocks.{block}.hook_resid_post"'
        )
    if not isinstance(name, str):
        raise SAEError(f"{source}: field {name_field!r} must be a string, got {name!r}")
    if m := _TRANSFORMER_LENS.fullmatch(name):
        index = int(m[1])
        layer = index + 1 if m[2] == "post" else index
    elif m := _HF_MODULE.fullmatch(name):
        index = int(m[1])
        layer = index + 1
    else:
        raise SAEError(
            f"{source}: field {name_field!r} is {name!r}, which is not a residual-stream hook "
            "the monitor can read (blocks.N.hook_resid_post, blocks.N.hook_resid_pre or "
            "model.layers.N)"
        )
    if layer < 1:
        raise SAEError(
            f"{source}: field {name_field!r} is {name!r}: that is the embeddings, before any "
            "decoder layer; the monitor reads layers 1 and up"
        )
    if block is not None and (isinstance(block, bool) or block != index):
        raise SAEError(
            f"{source}: field {block_field!r} is {block!r} but field {name_field!r} is "
            f"{name!r} (block {index}); they disagree"
        )
    return layer


def _field(cfg: Mapping[str, Any], names: tuple[str, ...], source: str) -> tuple[str, Any]:
    """The one value given for a field, at the top level or under metadata, and where it was.

    The same field given twice with two values is refused: either could be the right one.
    """
    found: list[tuple[str, Any]] = []
    scopes = [("", cfg)] + [(f"{m}.", cfg[m]) for m in _META if isinstance(cfg.get(m), Mapping)]
    for prefix, scope in scopes:
        for name in names:
            if scope.get(name) is not None:
                found.append((prefix + name, scope[name]))
    if not found:
        return names[0], None
    if any(value != found[0][1] for _, value in found[1:]):
        given = ", ".join(f"{where}={value!r}" for where, value in found)
        raise SAEError(f"{source}: the hook is given twice with different values ({given})")
    return found[0]
