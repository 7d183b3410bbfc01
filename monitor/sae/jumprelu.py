"""The JumpReLU SAE: a pre-activation survives only above its feature's learned threshold."""

from __future__ import annotations

import torch
from torch import Tensor

from monitor.sae.base import SparseAutoencoder


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    tensor_names = (*SparseAutoencoder.tensor_names, "threshold")

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.tensor("threshold"))

    def column_activation(self, pre: Tensor, features: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.tensor("threshold")[features])
