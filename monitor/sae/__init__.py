"""Sparse autoencoders: one architecture per module, picked by the ``architecture`` in cfg.json."""

from monitor.sae.base import SAEError, SparseAutoencoder
from monitor.sae.jumprelu import JumpReLUSAE
from monitor.sae.registry import ARCHITECTURES
from monitor.sae.saelens import load_sae, save_sae
from monitor.sae.sparse import SparseActivations
from monitor.sae.standard import StandardSAE
from monitor.sae.topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "JumpReLUSAE",
    "SAEError",
    "SparseActivations",
    "SparseAutoencoder",
    "StandardSAE",
    "TopKSAE",
    "load_sae",
    "save_sae",
]
