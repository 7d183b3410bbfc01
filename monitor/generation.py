"""Generation with the built-in models (transformers' ``generate``), steered or not: what
``safety-monitor generate``, ``serve-model`` and ``bench --steering`` run.

The model is loaded whole (the monitor's pipeline cuts it after layer L; generation needs every
layer and the LM head), with the SAE of the monitored layer for steering.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from monitor.config import Settings, resolve_device
from monitor.messages import Message
from monitor.models.loading import LoadedModel, load_model
from monitor.sae.base import SparseAutoencoder
from monitor.sae.builtin import shipped_sae_dir
from monitor.sae.saelens import load_sae
from monitor.steering import Clamp, Steerer, SteeringError, resolve


@dataclass(frozen=True)
class Generated:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    finish_reason: str  # stop (an end token) or length (max_new_tokens)


class Generator:
    """A whole model and, where one exists, its SAE; one generation at a time (a steering
    hook is on the shared model while it runs)."""

    def __init__(self, loaded: LoadedModel, sae: SparseAutoencoder | None, layer: int) -> None:
        self.loaded = loaded
        self.model: Any = loaded.model  # an HF causal LM (generate, generation_config)
        self.tokenizer = loaded.tokenizer
        self.sae = sae.to(loaded.device) if sae is not None else None
        self.layer = layer
        self.atlas_max: np.ndarray | None = None
        if sae is not None:
            from detectors.engine import load_atlas_max

            self.atlas_max = load_atlas_max(sae)
        self.lock = threading.Lock()
        self.model.eval()

    @classmethod
    def from_settings(cls, settings: Settings) -> Generator:
        """The configured model (whole) and SAE: the given one, else the shipped one (none for a
        model without: clamps are then refused)."""
        loaded = load_model(settings.model, settings.cache_dir, resolve_device(settings.device))
        sae: SparseAutoencoder | None = None
        if settings.sae is not None:
            sae = load_sae(settings.sae, expected_d_in=loaded.adapter.d_model)
        elif (shipped := shipped_sae_dir(loaded.name)) is not None:
            sae = load_sae(shipped, expected_d_in=loaded.adapter.d_model)
        from monitor.pipeline import pick_layer

        layer = pick_layer(settings.layer, sae, loaded, brought=settings.sae is not None)
        return cls(loaded, sae, layer)

    @property
    def name(self) -> str:
        return self.loaded.name

    def steerer(self, clamps: Iterable[Clamp], prompt: bool = False) -> Steerer | None:
        """The hook for these clamps (None for none); SteeringError when they cannot apply."""
        clamps = list(clamps)
        if not clamps:
            return None
        if self.sae is None:
            raise SteeringError(
                f"{self.name} has no trained SAE to steer with (give --sae DIR); clamps refused"
            )
        values = resolve(clamps, self.sae, self.atlas_max)
        return Steerer(self.sae, self.loaded.adapter.layers[self.layer - 1], values, prompt)

    def prompt_ids(self, messages: list[Message]) -> torch.Tensor:
        """The chat template applied, ready for the assistant's answer."""
        ids = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer versions
            ids = ids["input_ids"]
        return torch.tensor([list(ids)], device=self.loaded.device)

    def _kwargs(self, ids: torch.Tensor, max_new_tokens: int, temperature: float) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        kw: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": max_new_tokens,
            "pad_token_id": pad,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        else:  # greedy: no sampling knobs, so transformers does not warn about them
            kw.update(temperature=None, top_k=None, top_p=None)
        return kw

    def generate(
        self,
        messages: list[Message],
        max_new_tokens: int = 64,
        seed: int = 0,
        temperature: float = 0.0,
        steerer: Steerer | None = None,
    ) -> Generated:
        ids = self.prompt_ids(messages)
        return self._run(ids, self._kwargs(ids, max_new_tokens, temperature), seed, steerer)

    def _run(
        self, ids: torch.Tensor, kw: dict[str, Any], seed: int, steerer: Steerer | None
    ) -> Generated:
        """One ``generate`` call under the lock, the steerer's hook on while it runs."""
        with self.lock, torch.no_grad(), steerer.active() if steerer else nullcontext():
            torch.manual_seed(seed)
            started = time.perf_counter()
            out = self.model.generate(**kw)
            seconds = time.perf_counter() - started
        new = out[0, ids.shape[1] :].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        ended = bool(new) and new[-1] in _end_ids(self.tokenizer, self.model)
        return Generated(text, ids.shape[1], len(new), seconds, "stop" if ended else "length")

    def generate_batch(
        self, prompts: list[str], max_new_tokens: int, steerer: Steerer | None = None
    ) -> tuple[list[str], float, int]:
        """Greedy answers to single-message ``prompts`` in one left-padded batch: (texts,
        seconds, new tokens counted over the whole batch, padding included)."""
        tok = self.tokenizer
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        ids = enc["input_ids"].to(self.loaded.device)
        kw = {
            **self._kwargs(ids, max_new_tokens, 0.0),
            "attention_mask": enc["attention_mask"].to(self.loaded.device),
        }
        with self.lock, torch.no_grad(), steerer.active() if steerer else nullcontext():
            started = time.perf_counter()
            out = self.model.generate(**kw)
            seconds = time.perf_counter() - started
        new = out[:, ids.shape[1] :]
        answers = [tok.decode(row, skip_special_tokens=True) for row in new]
        return answers, seconds, int(new.numel())

    def stream(
        self,
        messages: list[Message],
        max_new_tokens: int = 64,
        seed: int = 0,
        temperature: float = 0.0,
        steerer: Steerer | None = None,
        stop: threading.Event | None = None,
        done: list[Generated] | None = None,
    ) -> Iterator[str]:
        """The answer's text as it is generated (transformers' ``TextIteratorStreamer``; the
        generation runs in a thread of its own, under the lock). ``stop``: set it (a reader
        gone) and the generation ends after the token it is making; closing this iterator early
        sets it too. ``done``: the whole answer's ``Generated`` is appended to it once the text
        has all come. An error in the generation is raised here."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        halt = stop if stop is not None else threading.Event()
        ids = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kw = self._kwargs(ids, max_new_tokens, temperature)

        class Halted(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                return torch.full(
                    (input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device
                )

        results: list[Generated] = []
        failed: list[Exception] = []

        def run() -> None:
            try:
                halting = StoppingCriteriaList([Halted()])
                streamed = {**kw, "streamer": streamer, "stopping_criteria": halting}
                results.append(self._run(ids, streamed, seed, steerer))
            except Exception as exc:  # raised in the reader's thread, below
                failed.append(exc)
                streamer.end()  # else the reader would wait for text forever

        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        try:
            yield from streamer
        except BaseException:
            halt.set()  # closed early, or the reader failed: the generation ends too
            raise
        thread.join()
        if failed:
            raise failed[0]
        if done is not None:
            done.extend(results)

    def mean_loss(self, texts: list[str], steerer: Steerer | None = None) -> float:
        """Mean next-token loss over ``texts`` (each scored alone), with the clamps on every
        position when a steerer is given (its ``prompt`` should then be True)."""
        losses = []
        with self.lock, torch.no_grad():
            for text in texts:
                ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(self.loaded.device)
                with steerer.active() if steerer else nullcontext():
                    out = self.model(input_ids=ids, labels=ids)
                losses.append(float(out.loss))
        return float(np.mean(losses))


def _end_ids(tokenizer: Any, model: Any) -> set[int]:
    ends = model.generation_config.eos_token_id
    ids = set(ends if isinstance(ends, list) else [ends] if ends is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
