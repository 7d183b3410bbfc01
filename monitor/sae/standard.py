"""The standard (ReLU) SAE: ``f = relu((x - b_dec) @ W_enc + b_enc)``."""

from __future__ import annotations

import torch
from torch import Tensor

from monitor.sae.base import SparseAutoencoder


class StandardSAE(SparseAutoencoder):
    architecture = "standard"

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)
