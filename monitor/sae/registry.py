"""Architecture name (as written in cfg.json) to class."""

from monitor.sae.base import SparseAutoencoder
from monitor.sae.jumprelu import JumpReLUSAE
from monitor.sae.standard import StandardSAE
from monitor.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (StandardSAE, TopKSAE, JumpReLUSAE)
}
