"""The interface every SAE architecture implements, and the shared encoder affine map."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from monitor.sae.errors import SAEError
from monitor.sae.hooks import hook_layer
from monitor.sae.normalize import fold_into_weights, input_norm
from monitor.sae.sparse import SparseActivations

__all__ = ["ENCODE_CHUNK", "SAEError", "SparseAutoencoder"]  # SAEError: its old home

log = logging.getLogger(__name__)

# Tokens per encoder chunk: the dense pre-activations of one chunk ([chunk, d_sae] fp32, 32 MB at
# d_sae 8192) are the only dense feature tensor the monitor ever holds.
ENCODE_CHUNK = 1024

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SparseAutoencoder:
    """An SAE over ``d_in``-wide activations with ``d_sae`` features (SAELens tensor layout).

    Subclasses name their on-disk ``architecture`` and define which pre-activations survive.
    Every cfg field that changes the maths is honoured here or refused with an SAEError.
    """

    architecture: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")
    # whether ``rescale_acts_by_decoder_norm`` is defined for the architecture (SAELens: TopK)
    rescales_by_decoder_norm: ClassVar[bool] = False

    def __init__(
        self, cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], source: str = "cfg"
    ) -> None:
        """``cfg`` is the SAELens ``cfg.json`` content; ``tensors`` as stored on disk;
        ``source`` names the cfg in errors (load_sae passes the file)."""
        missing = [n for n in self.tensor_names if n not in tensors]
        if missing:
            raise SAEError(f"{self.architecture} SAE is missing tensor(s) {', '.join(missing)}")
        self.cfg = dict(cfg)
        self.source = source
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
        self.apply_b_dec_to_input = self._flag("apply_b_dec_to_input", default=True)
        self.norm = input_norm(cfg, source)
        self.rescale_acts_by_decoder_norm = self._flag("rescale_acts_by_decoder_norm", False)
        if self.rescale_acts_by_decoder_norm and not self.rescales_by_decoder_norm:
            raise SAEError(
                f"{source}: field 'rescale_acts_by_decoder_norm' is true, which is defined for "
                f"topk SAEs only, not {self.architecture}"
            )
        if self._flag("finetuning_scaling_factor", False):
            raise SAEError(
                f"{source}: field 'finetuning_scaling_factor' is true: fold the scaling factor "
                "into the decoder (W_dec * scaling_factor[:, None]) and set it to false"
            )
        reshape = cfg.get("reshape_activations") or "none"
        if reshape != "none":
            raise SAEError(
                f"{source}: field 'reshape_activations' is {reshape!r}: only 'none' (one "
                "residual-stream vector per token) is what the monitor reads"
            )
        hook_layer(self.cfg, source)  # a hook the monitor cannot read is refused now
        # Kept exactly as given, so saving writes back the same bits.
        self.stored = {n: tensors[n].detach().cpu().contiguous() for n in self.tensor_names}
        self.directory: Path | None = None  # where it was loaded from (its atlas lives there)
        self._fingerprint: str | None = None
        self._identity: str | None = None
        self.to("cpu")

    def _flag(self, name: str, default: bool) -> bool:
        value = self.cfg.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise SAEError(f"{self.source}: field {name!r} must be true or false, got {value!r}")
        return value

    def to(
        self, device: str | torch.device, dtype: torch.dtype | str | None = None
    ) -> SparseAutoencoder:
        """Put the compute copies on ``device``, computed in fp32 unless ``dtype`` asks for less.

        On CPU the compute is fp32 whatever is asked (an fp16 or bf16 file is upcast: half
        precision there is slow or missing). On an accelerator, ``dtype`` (``torch.bfloat16``,
        ``torch.float16`` or their names) trades precision for memory and speed. Either way
        ``encode``, ``decode`` and ``feature_values`` return fp32.
        """
        device = torch.device(device)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        dtype = dtype or torch.float32
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
        if device.type == "cpu" and dtype != torch.float32:
            log.warning("SAE compute stays float32 on CPU (%s was asked for)", dtype)
            dtype = torch.float32
        self.device, self.dtype = device, dtype
        folded = fold_into_weights(self.stored, self.norm, self.rescale_acts_by_decoder_norm)
        self._compute = {n: t.to(device=device, dtype=dtype) for n, t in folded.items()}
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

    @property
    def identity(self) -> str:
        """``sha256:`` + 16 hex digits over the tensors (``fingerprint``) and the cfg: which
        dictionary read a turn (stored per turn). The cfg goes in because it changes what the
        same weights encode (TopK ``k``, ``apply_b_dec_to_input``, ``exclude_norm_above``), so
        it differs from the rules' ``fingerprint`` of the same SAE. Computed once."""
        if self._identity is None:
            cfg = json.dumps(self.cfg, sort_keys=True, separators=(",", ":"), default=str)
            digest = hashlib.sha256(f"{self.fingerprint}\n{cfg}".encode()).hexdigest()
            self._identity = f"sha256:{digest[:16]}"
        return self._identity

    def tensor(self, name: str) -> Tensor:
        """The compute copy of a tensor (``dtype``, on the SAE's device), with the cfg's
        decoder-norm rescaling and input scale folded in (see ``monitor.sae.normalize``)."""
        return self._compute[name]

    @property
    def hook_layer(self) -> int | None:
        """Residual-stream layer this SAE was trained on, in the monitor's numbering (HF
        ``hidden_states`` index, >= 1); None when its cfg names no hook, which callers should
        accept only with a layer the user gave."""
        return hook_layer(self.cfg, self.source)

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

    def encoder_input(self, x: Tensor) -> Tensor:
        """``[tokens, d_in]`` activations as the encoder's matmul takes them: on the SAE's device
        and dtype, normalised as the cfg says, ``b_dec`` subtracted if it says so."""
        x = self.norm.apply(x.to(device=self.device, dtype=self.dtype))
        if self.apply_b_dec_to_input:
            x = x - self.tensor("b_dec")
        return x

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder affine map ``(x - b_dec) @ W_enc + b_enc``: ``[tokens, d_in]`` to ``d_sae``."""
        return torch.addmm(self.tensor("b_enc"), self.encoder_input(x), self.tensor("W_enc"))

    def encode(self, x: Tensor) -> SparseActivations:
        """Encode ``[tokens, d_in]`` activations into sparse features, a chunk at a time."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected activations [tokens, {self.d_in}], got {list(x.shape)}")
        if x.shape[0] == 0:
            return SparseActivations.empty(self.d_sae).to(self.device)
        parts = []
        for start in range(0, x.shape[0], ENCODE_CHUNK):
            counts, indices, values = self.sparsify(
                self.pre_activations(x[start : start + ENCODE_CHUNK])
            )
            parts.append(SparseActivations.from_counts(counts, indices, values.float(), self.d_sae))
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
        """The activations of ``features`` only, ``[tokens, len(features)]`` fp32 (steering
        reads and clamps a few). Where each feature depends on its own pre-activation alone
        (ReLU, JumpReLU) only their encoder columns are computed; TopK ranks every feature."""
        x = self.encoder_input(x)
        pre = torch.addmm(self.tensor("b_enc")[features], x, self.tensor("W_enc")[:, features])
        return self.column_activation(pre, features).float()

    def column_activation(self, pre: Tensor, features: Tensor) -> Tensor:
        """``activation`` on the pre-activations of the columns ``features``."""
        return self.activation(pre)

    def output_scale(self, x: Tensor) -> Tensor:
        """Per token of ``x`` (``[tokens, d_in]``), ``[tokens, 1]`` fp32: a change ``d`` in the
        decoder's output is ``d * output_scale(x)`` in the residual stream. 1 unless the SAE
        normalises each token (``normalize_activations`` constant_norm_rescale, layer_norm)."""
        return self.norm.output_scale(x.to(device=self.device, dtype=torch.float32))

    def decode(self, feats: SparseActivations, inputs: Tensor | None = None) -> Tensor:
        """Reconstruction ``f @ W_dec + b_dec`` from sparse features: ``[tokens, d_in]`` fp32.

        ``inputs``, the activations that were encoded, is needed (and only used) when the SAE
        normalises each token: the reconstruction is scaled back to their units.
        """
        w_dec = self.tensor("W_dec")
        rows = torch.repeat_interleave(
            torch.arange(feats.n_tokens, device=self.device), feats.indptr[1:] - feats.indptr[:-1]
        )
        out = self.tensor("b_dec").expand(feats.n_tokens, -1).clone()
        values = feats.values.to(device=self.device, dtype=self.dtype)
        out.index_add_(0, rows, w_dec[feats.indices] * values.unsqueeze(1))
        if self.norm.per_token:
            if inputs is None:
                raise SAEError(
                    f"{self.source}: normalize_activations is {self.norm.kind!r}, which scales "
                    "each token: decode(feats, inputs) needs the activations that were encoded"
                )
            out = self.norm.restore(out.float(), inputs.to(device=self.device).float())
        return out.float()
