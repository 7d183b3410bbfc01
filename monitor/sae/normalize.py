"""What an SAE's cfg says to do to activations around the encoder, done exactly or refused.

``normalize_activations`` (SAELens):

- ``none``: raw activations.
- ``expected_average_only_in``: training multiplied every activation by one dataset-wide constant
  ``s`` (making the mean norm sqrt(d_in)), so the features are those of ``s * x`` and the
  reconstruction is the decoder's output divided by ``s``. SAELens folds ``s`` into the weights
  when training ends and then writes ``none``; a cfg still saying ``expected_average_only_in``
  has unfolded weights (a checkpoint, or a release whose ``s`` lives in SAELens' own
  directory) and is usable only with ``s``: ``norm_scaling_factor`` in cfg.json, or SAELens'
  ``activation_scaler.json`` beside it. Without it, refused.
- ``constant_norm_rescale``: each token is scaled to norm sqrt(d_in) before the encoder, and the
  reconstruction scaled back by the same factor.
- ``layer_norm``: each token has its mean removed and is divided by (its standard deviation,
  Bessel-corrected, + 1e-5); the reconstruction is multiplied by that standard deviation (without
  the 1e-5) and the mean added back.

The two per-token ones need the encoded activations again to decode (``restore``).

``rescale_acts_by_decoder_norm`` (TopK): pre-activations are multiplied by the norm of each
feature's decoder row before the top k are taken, and divided by it again before decoding; that
is the SAE with unit-norm decoder rows and the norms moved into the encoder, which is how it is
computed here. Both this and ``s`` are folded into the fp32 compute copies only: the stored
tensors, and so the fingerprint and what ``save_sae`` writes, stay as given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from monitor.sae.errors import SAEError

KINDS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
PER_TOKEN = ("constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5
SCALE_FIELD = "norm_scaling_factor"


@dataclass(frozen=True)
class InputNorm:
    """``kind`` is one of KINDS; ``scale`` is the ``s`` of ``expected_average_only_in``."""

    kind: str = "none"
    scale: float | None = None

    @property
    def per_token(self) -> bool:
        return self.kind in PER_TOKEN

    def apply(self, x: Tensor) -> Tensor:
        """``[tokens, d_in]`` activations as the encoder was trained to see them."""
        if self.kind == "constant_norm_rescale":
            return x / self.output_scale(x)
        if self.kind == "layer_norm":
            centred = x - x.mean(dim=1, keepdim=True)
            return centred / (centred.std(dim=1, keepdim=True) + LAYER_NORM_EPS)
        return x  # none; expected_average_only_in is folded into the weights

    def output_scale(self, x: Tensor) -> Tensor:
        """Per token ``[tokens, 1]``: how much a change in the decoder's output moves the
        residual stream of the activations ``x``."""
        if self.kind == "constant_norm_rescale":
            # a zero vector stays zero instead of turning into NaNs
            norms = x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
            scale: Tensor = norms / math.sqrt(x.shape[1])
            return scale
        if self.kind == "layer_norm":
            return (x - x.mean(dim=1, keepdim=True)).std(dim=1, keepdim=True)
        return torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)

    def restore(self, out: Tensor, x: Tensor) -> Tensor:
        """The decoder's output ``out`` back in the units of the encoded activations ``x``."""
        if self.kind == "layer_norm":
            return out * self.output_scale(x) + x.mean(dim=1, keepdim=True)
        return out * self.output_scale(x)


def input_norm(cfg: Mapping[str, Any], source: str) -> InputNorm:
    """The ``normalize_activations`` of ``cfg`` (and its scale); SAEError names ``source``."""
    value = cfg.get("normalize_activations")
    # before SAELens 6 it was a bool, True meaning the dataset-wide scale
    kind = {None: "none", False: "none", True: "expected_average_only_in"}.get(value, value)
    if kind not in KINDS:
        raise SAEError(
            f"{source}: field 'normalize_activations' is {value!r}, not one of {', '.join(KINDS)}"
        )
    scale = cfg.get(SCALE_FIELD)
    if kind != "expected_average_only_in":
        if scale is not None:
            raise SAEError(
                f"{source}: field {SCALE_FIELD!r} is {scale!r} but normalize_activations is "
                f"{value!r}; a scale belongs only to 'expected_average_only_in'"
            )
        return InputNorm(kind)
    if scale is None:
        raise SAEError(
            f"{source}: field 'normalize_activations' is {value!r} with no scale: the weights "
            "want inputs multiplied by a dataset-wide factor s that this cfg does not carry "
            f"(SAELens keeps it in activation_scaler.json, or in pretrained_saes.yaml as "
            f"{SCALE_FIELD}). Give {SCALE_FIELD!r}, or fold it (W_enc * s, W_dec / s, "
            "b_dec / s) and set 'none'"
        )
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < math.inf:
        raise SAEError(f"{source}: field {SCALE_FIELD!r} must be a positive number, got {scale!r}")
    return InputNorm(kind, float(scale))


def fold_into_weights(
    stored: Mapping[str, Tensor], norm: InputNorm, rescale_by_decoder_norm: bool
) -> dict[str, Tensor]:
    """fp32 copies of ``stored`` with the decoder-norm rescaling and the input scale folded in
    (new tensors: ``stored`` is never written to)."""
    w = {n: t.to(torch.float32) for n, t in stored.items()}
    if rescale_by_decoder_norm:
        norms = w["W_dec"].norm(dim=1)
        # a zero row's feature never fires (its pre-activation is multiplied by 0); keep it 0
        divisor = torch.where(norms > 0, norms, torch.ones_like(norms))
        w["W_enc"] = w["W_enc"] * norms
        w["b_enc"] = w["b_enc"] * norms
        w["W_dec"] = w["W_dec"] / divisor.unsqueeze(1)
    if norm.scale is not None:
        w["W_enc"] = w["W_enc"] * norm.scale
        w["W_dec"] = w["W_dec"] / norm.scale
        w["b_dec"] = w["b_dec"] / norm.scale
    return w
