"""The one place that knows where a Hugging Face causal LM keeps its decoder layers.

Everything model-specific in the pipeline goes through this adapter; the rest of the code sees a
stack of decoder layers, a width, and a few numbers for cost accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Attribute names of the decoder layer list, by family: Llama/Gemma/Mistral/Qwen use `layers`,
# GPT-2/GPT-J/Falcon `h`, some research models `blocks`.
_LAYER_ATTRS = ("layers", "h", "blocks")


@dataclass(frozen=True)
class ModelAdapter:
    """Where the decoder stack lives and how wide it is."""

    base: nn.Module  # the decoder stack without the LM head (HF's ``base_model``)
    layers: nn.ModuleList
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int

    @classmethod
    def for_model(cls, model: nn.Module) -> ModelAdapter:
        """Inspect a loaded HF causal LM; raise ValueError if its layout is not recognised."""
        base = getattr(model, "base_model", model)
        layers = _find_layers(base)
        if layers is None:
            raise ValueError(
                f"{type(model).__name__}: no decoder layer list found "
                f"(looked for attributes {', '.join(_LAYER_ATTRS)} on {type(base).__name__})"
            )
        cfg = model.config.get_text_config()  # type: ignore[union-attr,operator]
        d_model = _first(cfg, "hidden_size", "n_embd", "d_model")
        n_heads = _first(cfg, "num_attention_heads", "n_head")
        head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
        return cls(base, layers, d_model, len(layers), n_heads, head_dim)

    def linear_params(self, n_layers: int) -> int:
        """Weights of the linear maps in the first ``n_layers`` layers (2 FLOPs each per token)."""
        total = 0
        for layer in self.layers[:n_layers]:
            for mod in layer.modules():
                if isinstance(mod, nn.Linear):
                    total += mod.weight.numel()
        return total

    def forward_flops_per_token(self, n_layers: int, seq_len: int) -> float:
        """Analytic FLOPs per token of ``n_layers`` layers at ``seq_len``.

        Linear maps cost 2 FLOPs per weight; attention costs QKᵀ plus AV over the whole
        ``seq_len`` square, which is what the attention kernel computes for a padded batch.
        """
        attention = 2 * 2 * seq_len * self.n_heads * self.head_dim * n_layers
        return 2.0 * self.linear_params(n_layers) + attention


def _find_layers(base: nn.Module) -> nn.ModuleList | None:
    for holder in (base, getattr(base, "decoder", None)):
        if holder is None:
            continue
        for attr in _LAYER_ATTRS:
            layers = getattr(holder, attr, None)
            if isinstance(layers, nn.ModuleList):
                return layers
    return None


def _first(cfg: object, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"model config has none of {', '.join(names)}")
