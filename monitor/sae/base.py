"""The interface every SAE architecture implements, and the shared encoder affine map."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from monitor.sae.sparse import SparseActivations

# Tokens per encoder chunk: the dense pre-activations of one chunk ([chunk, d_sae] fp32, 32 MB at
# d_sae 8192) are the only dense feature tensor the monitor ever holds.
ENCODE_CHUNK = 1024


class SAEError(ValueError):
    """An SAE that cannot be built or loaded, with the file and field at fault."""


class SparseAutoencoder:
    """An SAE over ``d_in``-wide activations with ``d_sae`` features (SAELens tensor layout).

    Subclasses name their on-disk ``architecture`` and define which pre-activations survive.
    """

    architecture: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")

    def __init__(self, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """``cfg`` is the SAELens ``cfg.json`` content; ``tensors`` as stored on disk."""
        missing = [n for n in self.tensor_names if n not in tensors]
        if missing:
            raise SAEError(f"{self.architecture} SAE is missing tensor(s) {', '.join(missing)}")
        self.cfg = dict(cfg)
        self.d_in = int(cfg["d_in"])
        self.d_sae = int(cfg["d_sae"])
        expected = {
            "W_enc": (self.d_in, self.d_sae),
            "b_enc": (self.d_sae,),
            "W_dec": (self.d_sae, self.d_in),
            "b_dec": (self.d_in,),
            "threshold": (self.d_sae,),
        }
        for name in self.tensor_names:
            shape = tuple(tensors[name].shape)
            if shape != expected[name]:
                raise SAEError(
                    f"tensor {name} has shape {list(shape)}, but d_in={self.d_in} and "
                    f"d_sae={self.d_sae} need {list(expected[name])}"
                )
        norm = cfg.get("normalize_activations") or "none"
        if norm != "none":
            raise SAEError(
                f"normalize_activations={norm!r} is not supported; fold the scaling into the "
                "weights and set it to 'none'"
            )
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
        # Kept exactly as given, so saving writes back the same bits.
        self.stored = {n: tensors[n].detach().cpu().contiguous() for n in self.tensor_names}
        self.device = torch.device("cpu")
        self.directory: Path | None = None  # where it was loaded from (its atlas lives there)
        self._fingerprint: str | None = None
        self._compute = {n: t.to(torch.float32) for n, t in self.stored.items()}

    def to(self, device: str | torch.device) -> SparseAutoencoder:
        """Move the fp32 compute copies to ``device``."""
        self.device = torch.device(device)
        self._compute = {n: t.to(self.device) for n, t in self._compute.items()}
        return self

    @property
    def fingerprint(self) -> str:
        """``sha256:`` + 16 hex digits over the stored tensors: which SAE a rule was written for.

        Tensor names, dtypes, shapes and bytes go in, so a retrained or re-exported dictionary
        gets a new fingerprint and rules written for the old one are refused.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name in sorted(self.stored):
                t = self.stored[name]
                digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes())
            self._fingerprint = f"sha256:{digest.hexdigest()[:16]}"
        return self._fingerprint

    def tensor(self, name: str) -> Tensor:
        """The fp32 compute copy of a tensor, on the SAE's device."""
        return self._compute[name]

    @property
    def hook_layer(self) -> int | None:
        """Residual-stream layer this SAE was trained on, in the monitor's numbering, if known."""
        meta = self.cfg.get("metadata") or {}
        hook = self.cfg.get("hook_name") or meta.get("hook_name")
        layer = self.cfg.get("hook_layer", meta.get("hook_layer"))
        if not isinstance(hook, str) or layer is None:
            return None
        # TransformerLens names: resid_post of block i is after i+1 layers; resid_pre of block i
        # is after i layers. The monitor counts layers run.
        if hook.endswith("hook_resid_post"):
            return int(layer) + 1
        if hook.endswith("hook_resid_pre"):
            return int(layer)
        return None

    @property
    def exclude_norm_above(self) -> float | None:
        """Residuals longer than this are attention sinks ("massive activations"), not text.

        Such tokens (a few per 100k, 100x the usual norm) were left out of training; the
        pipeline gives them no features and evaluation leaves them out. Set at export from the
        training data (10x its median norm); absent for SAEs from elsewhere.
        """
        value = self.cfg.get("exclude_norm_above")
        return float(value) if value is not None else None

    def keep_mask(self, x: Tensor) -> Tensor:
        """True for rows of ``x`` (``[tokens, d_in]``) that are not massive activations."""
        limit = self.exclude_norm_above
        if limit is None:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        keep: Tensor = x.norm(dim=1) <= limit
        return keep

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder affine map ``(x - b_dec) @ W_enc + b_enc``: ``[tokens, d_in]`` to ``d_sae``."""
        if self.apply_b_dec_to_input:
            x = x - self.tensor("b_dec")
        return torch.addmm(self.tensor("b_enc"), x, self.tensor("W_enc"))

    def encode(self, x: Tensor) -> SparseActivations:
        """Encode ``[tokens, d_in]`` activations into sparse features, a chunk at a time."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected activations [tokens, {self.d_in}], got {list(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        if x.shape[0] == 0:
            return SparseActivations.empty(self.d_sae).to(self.device)
        parts = []
        for start in range(0, x.shape[0], ENCODE_CHUNK):
            counts, indices, values = self.sparsify(
                self.pre_activations(x[start : start + ENCODE_CHUNK])
            )
            parts.append(SparseActivations.from_counts(counts, indices, values, self.d_sae))
        return parts[0] if len(parts) == 1 else SparseActivations.concat(parts)

    def sparsify(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row active counts, then row-major active indices and values."""
        acts = self.activation(pre)
        mask = acts > 0
        return mask.sum(dim=1), mask.nonzero()[:, 1], acts[mask]

    def activation(self, pre: Tensor) -> Tensor:
        """The architecture's nonlinearity on a dense chunk of pre-activations."""
        raise NotImplementedError

    def feature_values(self, x: Tensor, features: Tensor) -> Tensor:
        """The activations of ``features`` only, ``[tokens, len(features)]`` (steering reads
        and clamps a few). Where each feature depends on its own pre-activation alone (ReLU,
        JumpReLU) only their encoder columns are computed; TopK ranks every feature."""
        if self.apply_b_dec_to_input:
            x = x - self.tensor("b_dec")
        pre = torch.addmm(self.tensor("b_enc")[features], x, self.tensor("W_enc")[:, features])
        return self.column_activation(pre, features)

    def column_activation(self, pre: Tensor, features: Tensor) -> Tensor:
        """``activation`` on the pre-activations of the columns ``features``."""
        return self.activation(pre)

    def decode(self, feats: SparseActivations) -> Tensor:
        """Reconstruction ``f @ W_dec + b_dec`` from sparse features: ``[tokens, d_in]``."""
        w_dec = self.tensor("W_dec")
        rows = torch.repeat_interleave(
            torch.arange(feats.n_tokens, device=self.device), feats.indptr[1:] - feats.indptr[:-1]
        )
        out = self.tensor("b_dec").expand(feats.n_tokens, -1).clone()
        out.index_add_(0, rows, w_dec[feats.indices] * feats.values.unsqueeze(1))
        return out
