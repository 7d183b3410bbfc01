"""Chat-formatted training text: SmolLM2-Instruct answering varied prompts written for the project.

The SAE must see the chat template and assistant-style text, since that is what it monitors.
Prompts are topic x task combinations, some with a system prompt; sampling is seeded per batch.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from monitor.training.sources import Document

TOPICS = [
    "a delayed parcel delivery",
    "a bank account login",
    "password security",
    "a job interview",
    "renewing a passport",
    "photosynthesis",
    "the French Revolution",
    "a broken laptop",
    "a team meeting agenda",
    "a refund for a faulty kettle",
    "climate change",
    "a birthday party",
    "learning to play guitar",
    "a sorting algorithm",
    "reading a CSV file in Python",
    "an SQL query for monthly sales",
    "a web server returning 500 errors",
    "a phishing email",
    "a lottery prize notification",
    "an unpaid invoice",
    "a gift card request from a manager",
    "a doctor's appointment",
    "the water cycle",
    "a mortgage application",
    "healthy breakfasts",
    "a home network router",
    "a volcano",
    "the stock market",
    "a hiking trip",
    "a cover letter",
    "an API key stored in source code",
    "user input passed to eval",
    "two-factor authentication",
    "a hotel booking",
    "the moon landing",
    "a flat tyre",
    "composting",
    "a chess opening",
]
TASKS = [
    "Explain {t} to a beginner.",
    "Write a short email about {t}.",
    "Give three tips about {t}.",
    "Summarise the key facts about {t} in two sentences.",
    "What are common mistakes people make with {t}?",
    "Write a Python function related to {t}.",
    "I think {t} is not worth worrying about. Am I right?",
    "Write a short story that involves {t}.",
    "List the steps to deal with {t}.",
    "Answer briefly: what should I know about {t}?",
]
SYSTEM_PROMPTS = [
    None,
    None,
    "You are a helpful assistant for a customer support team.",
    "You are a concise coding assistant.",
    "You are a friendly tutor. Keep answers short.",
]


def prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` distinct prompt conversations, in a seeded order."""
    pairs = list(itertools.product(TOPICS, TASKS))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    out = []
    for i, (topic, task) in enumerate(pairs[:n]):
        system = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": task.format(t=topic)})
        out.append(messages)
    return out


@torch.inference_mode()
def generate_conversations(
    model: Any,
    tokenizer: Any,
    n: int,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 128,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[Document]:
    """Sample the model's answers to ``n`` prompts; each batch reseeded, so a run is repeatable."""
    all_prompts = prompts(n, seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    try:
        for b in range(0, len(all_prompts), batch_size):
            batch = all_prompts[b : b + batch_size]
            texts = [
                tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m in batch
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed * 1_000_003 + b)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=0.8,
                top_p=0.95,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            answers = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for i, (messages, answer) in enumerate(zip(batch, answers, strict=True)):
                turns = [(m["role"], m["content"]) for m in messages]
                turns.append(("assistant", answer.strip()))
                yield Document("chat", f"chat-{seed}-{b + i:05d}", messages=tuple(turns))
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        tokenizer.padding_side = side
