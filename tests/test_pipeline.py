"""The pipeline end to end on the real model: batching, sparse features per token, results."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from monitor.config import Settings
from monitor.messages import Role
from monitor.models import LoadedModel, ModelLoadError, load_model
from monitor.pipeline import Pipeline
from monitor.sae.builtin import placeholder_topk_sae
from monitor.tokenization import InputTokenizer

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def pipeline(cache_dir: Path) -> Pipeline:
    loaded = load_model(MODEL, cache_dir)
    sae = placeholder_topk_sae(loaded.adapter.d_model, d_sae=1024, k=16)
    return Pipeline(loaded, sae, layer=6, max_tokens=64, batch_size=2)


def test_batched_encode_equals_encoding_each_input_alone(
    pipeline: Pipeline, full_models: dict[str, LoadedModel]
):
    inputs = [
        "A much longer input, so that the others in its batch need padding to match it.",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "Short.",
    ]
    together = pipeline.encode(inputs)
    for item, result in zip(inputs, together, strict=True):
        (alone,) = pipeline.encode([item])
        assert result.ids == alone.ids
        assert result.features.index_sets() == alone.features.index_sets()
        torch.testing.assert_close(
            result.features.to_dense(), alone.features.to_dense(), rtol=1e-4, atol=1e-3
        )
    # and the residuals the SAE saw are the whole model's hidden state at the layer
    full = full_models[MODEL].model
    ids = together[0].ids
    with torch.inference_mode():
        reference = full(input_ids=torch.tensor([ids]), output_hidden_states=True)
    (residual,) = pipeline.residuals([ids])
    scale = float(reference.hidden_states[6].abs().max())
    assert float((residual - reference.hidden_states[6][0]).abs().max()) <= 1e-6 * scale


def test_every_token_has_a_row_of_at_most_k_features(pipeline: Pipeline):
    (result,) = pipeline.encode(["Count the rows, one per token."])
    assert result.features.n_tokens == len(result.ids) == len(result.tokens) == len(result.roles)
    counts = result.features.indptr[1:] - result.features.indptr[:-1]
    assert 0 < int(counts.max()) <= 16
    assert all(r == Role.USER for r in result.roles)


def test_empty_and_over_limit_inputs_get_their_documented_results(pipeline: Pipeline):
    limited = copy.copy(pipeline)
    limited.tokenizer = InputTokenizer(pipeline.model.tokenizer, 100)  # max_input_tokens
    empty, long = limited.encode(["", "many words " * 100])
    assert empty.ids == []
    assert empty.features.n_tokens == 0
    assert len(long.ids) == 100 and long.dropped > 0, "the most recent 100 tokens"
    assert long.features.n_tokens == 100 and long.windows == 2


def test_a_long_input_is_read_whole_in_overlapping_windows(pipeline: Pipeline):
    text = " ".join(f"item{i} costs {i * 7} coins;" for i in range(40))
    tokenized = pipeline.tokenizer.tokenize(text)
    assert len(tokenized) > 3 * pipeline.window
    (whole,) = pipeline.encode([text])
    assert whole.ids == tokenized.ids and whole.dropped == 0 and whole.windows >= 4
    assert whole.features.n_tokens == len(whole.ids)
    dense = whole.features.to_dense()
    # the first window reads exactly as the input's first max_tokens tokens alone
    (prefix,) = pipeline.encode_ids([tokenized.ids[: pipeline.window]])
    torch.testing.assert_close(dense[: pipeline.window], prefix.to_dense(), rtol=1e-4, atol=1e-3)
    # every token is read once, by the window that gives it the most context before it
    plan = pipeline._windows(tokenized)
    alone = pipeline.encode_ids([ids for ids, _roles, _own in plan])
    at = 0
    for (ids, _roles, own), feats in zip(plan, alone, strict=True):
        n = len(ids) - own
        torch.testing.assert_close(dense[at : at + n], feats.to_dense()[own:], rtol=1e-4, atol=1e-3)
        assert own == 0 or own > pipeline.overlap - 1, "a later window starts with context"
        at += n
    assert at == len(whole.ids)
    # the per-role residual sums count each read token once: all but the attention sink
    assert whole.residual_counts is not None
    assert int(whole.residual_counts.sum()) <= len(whole.ids) - 1
    assert int(whole.residual_counts[int(Role.USER)]) >= len(whole.ids) - 1 - whole.windows


def test_role_mask_selects_the_response(pipeline: Pipeline):
    (result,) = pipeline.encode(
        [[{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."}]]
    )
    mask = result.role_mask(Role.ASSISTANT)
    assert "".join(t for t, m in zip(result.tokens, mask, strict=True) if m) == "Answer."


def test_sae_of_another_width_is_refused(cache_dir: Path):
    loaded = load_model(MODEL, cache_dir)
    with pytest.raises(ValueError, match="does not match"):
        Pipeline(loaded, placeholder_topk_sae(640, d_sae=64, k=4), layer=3)


def test_unknown_model_is_a_clear_error_and_never_downloads(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_model("no-such-org/no-such-model", tmp_path)


def test_from_settings_takes_the_layer_from_the_settings(cache_dir: Path):
    pipe = Pipeline.from_settings(Settings(cache_dir=cache_dir, model=MODEL, layer=4))
    assert pipe.layer == 4
    assert len(pipe.forward.adapter.layers) == 4, "layers after L are freed"


def test_a_deeper_layer_after_the_pipeline_freed_it_is_a_clear_error(pipeline: Pipeline):
    from monitor.forward import TruncatedForward

    with pytest.raises(ValueError, match="were freed by an earlier truncation"):
        TruncatedForward(pipeline.model.adapter, pipeline.layer + 1)


def test_the_attention_sink_token_gets_no_features(pipeline: Pipeline):
    (result,) = pipeline.encode(["The first token is the attention sink."])
    assert result.features.top(0, 5) == []
    assert all(result.features.top(t, 5) for t in range(1, len(result.ids)))
