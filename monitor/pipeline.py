"""Texts and conversations in, per-token sparse SAE features out.

tokenize (chat template, roles, context policy) → windows → batch (right padding, attention
mask) → truncated forward to layer L → SAE encode of the real tokens only → per-input sparse
features.

Windows: an input longer than ``max_tokens`` (the tokens of one forward pass) is read whole, in
overlapping windows of ``max_tokens``; each starts again with the BOS token when the input has
one. A window's first ``overlap`` tokens (a quarter of the window) are context only: their
features come from the window before, in which they have more of what precedes them. So every
token is read once, with at least ``overlap`` tokens of context before it (or all there is).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from monitor.config import DEFAULT_MAX_INPUT_TOKENS, Settings, resolve_device
from monitor.forward import TruncatedForward
from monitor.messages import Role
from monitor.models.loading import LoadedModel, load_model
from monitor.sae.base import SAEError, SparseAutoencoder
from monitor.sae.builtin import default_sae
from monitor.sae.saelens import load_sae
from monitor.sae.sparse import SparseActivations
from monitor.tokenization import InputTokenizer, PipelineInput, TokenizedInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedInput:
    """One input's tokens, their roles, and their sparse features (one row per token)."""

    tokens: list[str]
    ids: list[int]
    roles: list[Role]
    features: SparseActivations
    dropped: int  # tokens cut from the front by the context policy
    windows: int = 1  # forward-pass windows the input was read in
    # Per role (indexed by ``Role``): the sum of the layer-L residuals of the tokens that got
    # features, ``[len(Role), d_model]``, and how many there were. Dense probes read the mean.
    residual_sums: Tensor | None = None
    residual_counts: Tensor | None = None

    def role_mask(self, *roles: Role) -> list[bool]:
        """True for tokens whose role is one of ``roles``."""
        return [r in roles for r in self.roles]


class Pipeline:
    """A model truncated at ``layer`` and an SAE over that layer's residual stream."""

    def __init__(
        self,
        loaded: LoadedModel,
        sae: SparseAutoencoder,
        layer: int,
        max_tokens: int = 512,
        batch_size: int = 8,
        max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS,
        sae_dtype: str = "float32",
    ) -> None:
        if sae.d_in != loaded.adapter.d_model:
            raise ValueError(
                f"SAE d_in {sae.d_in} does not match {loaded.name}'s width {loaded.adapter.d_model}"
            )
        self.model = loaded
        self.sae = sae.to(loaded.device, dtype=sae_dtype)
        self.layer = layer
        self.batch_size = batch_size
        if max_tokens < 8:
            raise ValueError("max_tokens (the window) must be at least 8")
        self.window = max_tokens
        self.overlap = max_tokens // 4
        # the most of one input that is read; the context policy cuts the front of a longer one
        self.tokenizer = InputTokenizer(loaded.tokenizer, max(max_input_tokens, max_tokens))
        self.forward = TruncatedForward(loaded.adapter, layer, drop_later_layers=True)
        self._pad_id = _pad_id(loaded.tokenizer)

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        """Load the configured model and SAE; pick the layer (setting, else SAE's, else model's)."""
        loaded = load_model(settings.model, settings.cache_dir, resolve_device(settings.device))
        if settings.sae is not None:
            sae = load_sae(settings.sae, expected_d_in=loaded.adapter.d_model)
        else:
            sae = default_sae(loaded.name, loaded.adapter.d_model)
        layer = pick_layer(settings.layer, sae, loaded, brought=settings.sae is not None)
        return cls(
            loaded, sae, layer, settings.max_tokens, settings.batch_size,
            settings.max_input_tokens, settings.sae_dtype,
        )  # fmt: skip

    def encode(self, inputs: Sequence[PipelineInput]) -> list[EncodedInput]:
        """Encode texts or conversations; results come back in input order."""
        return self.encode_tokenized([self.tokenizer.tokenize(item) for item in inputs])

    def encode_tokenized(self, tokenized: Sequence[TokenizedInput]) -> list[EncodedInput]:
        """Encode inputs already through ``self.tokenizer`` (callers that batch by tokens)."""
        plans = [self._windows(t) for t in tokenized]
        sequences = [ids for plan in plans for ids, _roles, _own in plan]
        roles = [r for plan in plans for _ids, r, _own in plan]
        features, sums, counts = self._encode(sequences, roles)
        out, at = [], 0
        for t, plan in zip(tokenized, plans, strict=True):
            parts = range(at, at + len(plan))
            at += len(plan)
            owned = [
                features[i].rows(own, len(sequences[i]))
                for i, (_, _, own) in zip(parts, plan, strict=True)
            ]
            merged = SparseActivations.concat(owned) if len(owned) > 1 else features[parts[0]]
            total = sum((sums[i] for i in parts), torch.zeros_like(sums[parts[0]]))
            n = sum((counts[i] for i in parts), torch.zeros_like(counts[parts[0]]))
            out.append(_encoded(t, merged, total, n, len(plan)))
        return out

    def _windows(self, t: TokenizedInput) -> list[tuple[list[int], list[int], int]]:
        """The forward-pass windows of one input: (ids, roles, first position it owns).

        A position a window does not own (its leading context) gets role -1, so that it adds
        nothing to the per-role residual sums; its features are dropped in the merge.
        """
        roles = [int(r) for r in t.roles]
        if len(t.ids) <= self.window:
            return [(t.ids, roles, 0)]
        bos = self.model.tokenizer.bos_token_id
        head = 1 if bos is not None and t.ids[0] == bos else 0
        room, step = self.window - head, self.window - head - self.overlap
        plan: list[tuple[list[int], list[int], int]] = []
        start = head
        while True:
            end = min(start + room, len(t.ids))
            own = 0 if not plan else head + self.overlap
            window_roles = roles[:head] + roles[start:end]
            if plan:
                window_roles[:own] = [-1] * own
            plan.append((t.ids[:head] + t.ids[start:end], window_roles, own))
            if end == len(t.ids):
                return plan
            start += step

    def encode_ids(self, sequences: Sequence[Sequence[int]]) -> list[SparseActivations]:
        """Sparse features of each token of each id sequence, in input order.

        A sequence's first token gets no features: its residual is the attention sink (about
        100x the norm of any other token's, whatever the token), which SAEs are not trained on.
        Nor does any other token whose residual is that long (see ``exclude_norm_above``).
        """
        return self._encode(sequences, None)[0]

    def _encode(
        self, sequences: Sequence[Sequence[int]], roles: Sequence[Sequence[int]] | None
    ) -> tuple[list[SparseActivations], list[Tensor], list[Tensor]]:
        """Features of every sequence and, when ``roles`` are given, per-role residual sums
        (a position with role -1 counts in none)."""
        n_roles, d = len(Role), self.model.adapter.d_model
        out: list[SparseActivations | None] = [None] * len(sequences)
        sums = [torch.zeros(n_roles, d) for _ in sequences]
        counts = [torch.zeros(n_roles) for _ in sequences]
        for batch, residuals in self._batched_residuals(sequences):
            lengths = [len(sequences[i]) for i in batch]
            keep = torch.ones(residuals.shape[0], dtype=torch.bool, device=residuals.device)
            starts = torch.tensor([0, *lengths[:-1]], device=residuals.device).cumsum(0)
            keep[starts] = False
            keep &= self.sae.keep_mask(residuals)
            feats = self.sae.encode(residuals[keep]).with_empty_rows(keep)
            start = 0
            for i in batch:
                n = len(sequences[i])
                out[i] = feats.rows(start, start + n)
                if roles is not None:
                    role = torch.as_tensor(roles[i], device=residuals.device)
                    kept = keep[start : start + n] & (role >= 0)
                    rows = residuals[start : start + n][kept].float()
                    s = torch.zeros(n_roles, d, device=rows.device).index_add_(0, role[kept], rows)
                    sums[i] = s.cpu()
                    counts[i] = torch.bincount(role[kept], minlength=n_roles).float().cpu()
                start += n
        empty = SparseActivations.empty(self.sae.d_sae)
        return [f if f is not None else empty for f in out], sums, counts

    def residuals(self, sequences: Sequence[Sequence[int]]) -> list[Tensor]:
        """Layer-L residual stream of each id sequence, ``[len, d_model]`` each, in input order."""
        d = self.model.adapter.d_model
        out: list[Tensor] = [torch.zeros(0, d) for _ in sequences]
        for batch, residuals in self._batched_residuals(sequences):
            start = 0
            for i in batch:
                n = len(sequences[i])
                out[i] = residuals[start : start + n]
                start += n
        return out

    @torch.inference_mode()
    def _batched_residuals(
        self, sequences: Sequence[Sequence[int]]
    ) -> Iterator[tuple[list[int], Tensor]]:
        """Yield (input indices, residuals of their real tokens concatenated in that order).

        Inputs are sorted by length so a batch pads little; empty inputs never reach the model.
        """
        order = sorted(
            (i for i, s in enumerate(sequences) if len(s) > 0), key=lambda i: -len(sequences[i])
        )
        device = self.model.device
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            width = len(sequences[batch[0]])
            ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(sequences[i])
                ids[row, :n] = torch.as_tensor(sequences[i], dtype=torch.long)
                mask[row, :n] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = self.forward(ids, mask)
            yield batch, hidden[mask.bool()]


def _encoded(
    tokenized: TokenizedInput,
    features: SparseActivations,
    sums: Tensor,
    counts: Tensor,
    windows: int,
) -> EncodedInput:
    return EncodedInput(
        tokens=tokenized.tokens,
        ids=tokenized.ids,
        roles=tokenized.roles,
        features=features.to("cpu"),
        dropped=tokenized.dropped,
        windows=windows,
        residual_sums=sums,
        residual_counts=counts,
    )


def _pad_id(tokenizer: object) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def pick_layer(
    asked: int | None, sae: SparseAutoencoder | None, loaded: LoadedModel, brought: bool
) -> int:
    """The layer to read: the one asked for, else the SAE's hook, else the model's default.

    An SAE the user brought that names no hook is refused unless a layer is asked for: running
    it at the model's default layer would give features of a layer it never saw, silently.
    """
    hook = sae.hook_layer if sae is not None else None
    if asked is None and hook is None and brought and sae is not None:
        where = getattr(sae, "directory", None) or "the SAE"
        raise SAEError(
            f"{where}: its cfg.json names no hook (hook_name, or metadata.hook_name), so the "
            "layer it reads is unknown; give it with --layer (SAFETY_MONITOR_LAYER)"
        )
    layer = asked or hook or loaded.default_layer
    if hook is not None and hook != layer:
        log.warning("SAE was trained on layer %d, but layer %d is used", hook, layer)
    return layer
