"""The truncated forward: run a causal LM's first L decoder layers and stop.

No later layer, no final norm, no LM head, no cache of every layer's hidden states: a forward
hook on layer L takes its output and ends the forward pass there. The hook sits on the model's own
modules, so embeddings, rotary tables, attention masks (causal, padding, sliding window) are built
by the model's own code for every architecture.
"""

from __future__ import annotations

import threading

from torch import Tensor, nn

from monitor.models.adapter import ModelAdapter


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the hook on layer L: everything after it is never computed."""


class TruncatedForward:
    """Residual stream after ``layer`` decoder layers: HF's ``hidden_states[layer]`` below the
    last layer (HF applies the final norm to its last hidden state; this never does)."""

    def __init__(self, adapter: ModelAdapter, layer: int, drop_later_layers: bool = False) -> None:
        """``drop_later_layers`` frees the layers after ``layer`` (the model is then cut short)."""
        if not 1 <= layer <= adapter.n_layers:
            raise ValueError(f"layer must be in 1..{adapter.n_layers} for this model, got {layer}")
        if layer > len(adapter.layers):
            raise ValueError(
                f"layers after {len(adapter.layers)} were freed by an earlier truncation; "
                "load the model again for a deeper layer"
            )
        self.adapter = adapter
        self.layer = layer
        self._base = adapter.base
        self._target = adapter.layers[layer - 1]
        if drop_later_layers:
            del adapter.layers[layer:]
        self._captured: Tensor | None = None
        # One pass at a time: the hook and what it captured live on the shared layer, so two
        # threads (two apps on one loaded pipeline, a backtest beside the service) would read
        # each other's residuals.
        self._lock = threading.Lock()

    def _hook(self, module: nn.Module, args: object, output: Tensor | tuple[Tensor, ...]) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[batch, pos]`` ids and mask to ``[batch, pos, d_model]`` residuals at the layer."""
        with self._lock:
            handle = self._target.register_forward_hook(self._hook)
            try:
                self._base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()
            captured, self._captured = self._captured, None
        assert captured is not None, "the forward pass never reached the hooked layer"
        return captured
