"""The SAE used when none is given: the one shipped for the model, else a labelled placeholder."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch

from monitor.sae.base import SparseAutoencoder
from monitor.sae.saelens import CFG_FILE, load_sae
from monitor.sae.topk import TopKSAE

log = logging.getLogger(__name__)

PLACEHOLDER_D_SAE = 8192
PLACEHOLDER_K = 32


def shipped_sae_dir(model_name: str) -> Path | None:
    """Directory of the SAE shipped as package data for a built-in model, if there is one."""
    root = Path(str(resources.files("monitor") / "data" / "sae" / model_name))
    return root if (root / CFG_FILE).is_file() else None


EVAL_SAMPLE = "eval_sample.jsonl"


def shipped_eval_sample(model_name: str) -> Path | None:
    """Held-out documents shipped beside the SAE, on which its ``metrics.json`` was measured."""
    root = shipped_sae_dir(model_name)
    return root / EVAL_SAMPLE if root is not None and (root / EVAL_SAMPLE).is_file() else None


def default_sae(model_name: str, d_in: int) -> SparseAutoencoder:
    """The shipped SAE for ``model_name``; without one, an untrained placeholder and a warning."""
    shipped = shipped_sae_dir(model_name)
    if shipped is not None:
        return load_sae(shipped, expected_d_in=d_in)
    log.warning(
        "no trained SAE ships for %s yet: using an untrained, randomly initialised TopK "
        "dictionary (d_sae=%d, k=%d). Its features are not interpretable; pass --sae PATH "
        "(SAELens format) for real ones.",
        model_name,
        PLACEHOLDER_D_SAE,
        PLACEHOLDER_K,
    )
    return placeholder_topk_sae(d_in)


def placeholder_topk_sae(
    d_in: int, d_sae: int = PLACEHOLDER_D_SAE, k: int = PLACEHOLDER_K, seed: int = 0
) -> TopKSAE:
    """A seeded TopK SAE at its training initialisation: unit-norm decoder rows, W_enc = W_decᵀ."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    tensors = {
        "W_enc": w_dec.T.contiguous(),
        "b_enc": torch.zeros(d_sae),
        "W_dec": w_dec,
        "b_dec": torch.zeros(d_in),
    }
    cfg = {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "model_name": "untrained-placeholder",
    }
    return TopKSAE(cfg, tensors)
