"""Steering: clamp SAE features in the residual stream while the model runs (the method of
Scaling Monosemanticity).

At the SAE's layer, each position's residual ``x`` is encoded, the chosen features are set to
their clamp values, and the result decoded with the SAE's reconstruction error added back; so
``x' = x + Σ_i (c_i - f_i(x)) · W_dec[i]``, and only the clamped features change. That form is
what runs: only the clamped features' activations are computed (every pre-activation for TopK,
which must rank them) and only their decoder rows are touched.

A clamp is ``FEATURE=VALUE``: an absolute activation (``6168=4.5``, ``6168=0`` suppresses) or a
multiple of the feature's maximum in the SAE's atlas (``6168=5x``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from monitor.sae.base import SparseAutoencoder

_CLAMP = re.compile(r"^\s*(\d+)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(x?)\s*$")


class SteeringError(ValueError):
    """A clamp that cannot be applied: malformed, an unknown feature, no atlas, no SAE."""


@dataclass(frozen=True)
class Clamp:
    feature: int
    value: float
    relative: bool = False  # value is a multiple of the feature's atlas maximum

    def __str__(self) -> str:
        return f"{self.feature}={self.value:g}{'x' if self.relative else ''}"


def parse_clamp(text: str) -> Clamp:
    """``"6168=5x"`` → Clamp(6168, 5.0, relative=True); SteeringError naming the text."""
    m = _CLAMP.match(text)
    if m is None:
        raise SteeringError(
            f"clamp {text!r}: expected FEATURE=VALUE, e.g. 6168=0, 6168=4.5 or 6168=5x"
        )
    value = float(m.group(2))
    if not np.isfinite(value):
        raise SteeringError(f"clamp {text!r}: the value must be finite")
    return Clamp(int(m.group(1)), value, relative=bool(m.group(3)))


def resolve(
    clamps: Iterable[Clamp], sae: SparseAutoencoder, atlas_max: np.ndarray | None
) -> dict[int, float]:
    """Feature index → activation to hold it at; SteeringError for an index the SAE does not
    have, a relative clamp without an atlas, or one feature clamped twice."""
    out: dict[int, float] = {}
    for c in clamps:
        if not 0 <= c.feature < sae.d_sae:
            raise SteeringError(
                f"clamp {c}: unknown feature {c.feature}; this SAE has features 0..{sae.d_sae - 1}"
            )
        if c.feature in out:
            raise SteeringError(f"clamp {c}: feature {c.feature} is clamped twice")
        if c.relative:
            if atlas_max is None:
                raise SteeringError(
                    f"clamp {c}: a multiple ('x') needs the SAE's atlas (atlas.npz), which it "
                    "lacks; give an absolute value"
                )
            out[c.feature] = c.value * float(atlas_max[c.feature])
        else:
            out[c.feature] = c.value
    return out


class Steerer:
    """A forward hook on decoder layer L that holds features at their values; ``active()``
    applies it for a block. ``prompt``: also on the prompt's positions (else only on the
    positions generated, i.e. every forward call after the first of a generation)."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        layer: nn.Module,
        values: dict[int, float],
        prompt: bool = False,
    ) -> None:
        self.sae = sae
        self.layer = layer
        self.prompt = prompt
        device = sae.device
        self.features = torch.tensor(sorted(values), dtype=torch.long, device=device)
        self.targets = torch.tensor(
            [values[f] for f in sorted(values)], dtype=torch.float32, device=device
        )
        # [n, d_in]: the rows touched, in fp32 like the residuals they are added to
        self.decoder = sae.tensor("W_dec")[self.features].float()
        self._calls = 0

    def _hook(self, module: nn.Module, args: object, output: Tensor | tuple[Tensor, ...]) -> object:
        self._calls += 1
        if not self.prompt and self._calls == 1:
            return None  # the prompt's pass of a generation
        hidden = output[0] if isinstance(output, tuple) else output
        steered = self.steer(hidden)
        if isinstance(output, tuple):
            return (steered, *output[1:])
        return steered

    def steer(self, hidden: Tensor) -> Tensor:
        """``[..., d_in]`` residuals with the clamped features set (tokens the SAE leaves out,
        massive activations, unchanged)."""
        x = hidden.reshape(-1, hidden.shape[-1]).to(device=self.sae.device, dtype=torch.float32)
        current = self.sae.feature_values(x, self.features)  # [tokens, n]
        delta = (self.targets - current) @ self.decoder  # [tokens, d_in]
        delta = delta * self.sae.output_scale(x)  # per-token normalised SAEs: back to x's units
        delta = delta * self.sae.keep_mask(x).unsqueeze(1)
        return (x + delta).to(dtype=hidden.dtype, device=hidden.device).reshape(hidden.shape)

    @contextmanager
    def active(self) -> Iterator[Steerer]:
        self._calls = 0
        handle = self.layer.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
