"""SAE cfg fields: the layer each hook form means, the maths-changing fields done exactly (against
hand-written formulas) or refused with the file, field and value, and the compute dtype.

Every SAE here is a real directory (cfg.json + sae_weights.safetensors) read by load_sae.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from monitor.sae import JumpReLUSAE, SAEError, SparseAutoencoder, StandardSAE, TopKSAE, load_sae

D_IN, D_SAE, K = 8, 24, 4


def weights(seed: int = 0, threshold: bool = False) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen),
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.3,
        # decoder rows of norms 0.5..3: rescaling by them changes which features win
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen)
        * torch.linspace(0.5, 3.0, D_SAE).unsqueeze(1)
        / math.sqrt(D_IN),
        "b_dec": torch.randn(D_IN, generator=gen) * 0.2,
    }
    if threshold:
        w["threshold"] = torch.rand(D_SAE, generator=gen)
    return w


def write_sae(
    path: Path,
    tensors: dict[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    **cfg: Any,
) -> Path:
    """An SAE directory; ``cfg`` fields set to None are left out."""
    path.mkdir(parents=True, exist_ok=True)
    full = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, **cfg}
    full = {key: value for key, value in full.items() if value is not None}
    tensors = weights() if tensors is None else tensors
    save_file(
        {n: t.to(dtype).contiguous() for n, t in tensors.items()}, path / "sae_weights.safetensors"
    )
    (path / "cfg.json").write_text(json.dumps(full))
    return path


def topk_relu(pre: Tensor, k: int = K) -> Tensor:
    values, indices = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, indices, torch.relu(values))


def inputs(n: int = 32, seed: int = 1) -> Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 4 + 1


# ---- the layer of each hook form --------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "layer"),
    [
        ({"hook_name": "blocks.14.hook_resid_post", "hook_layer": 14}, 15),  # this project's own
        ({"metadata": {"hook_name": "blocks.5.hook_resid_post", "model_name": "gpt2"}}, 6),  # v6
        ({"metadata": {"hook_name": "blocks.5.hook_resid_pre", "hook_layer": 5}}, 5),
        ({"meta": {"hook_name": "blocks.7.hook_resid_post"}}, 8),  # v6 release candidates
        ({"hook_name": "blocks.3.hook_resid_pre"}, 3),
        ({"hook_point": "blocks.2.hook_resid_post", "hook_point_layer": 2}, 3),  # SAELens < 1
        ({"hook_name": "model.layers.5"}, 6),  # HF: the output of decoder layer 5
        ({"hook_name": "model.language_model.layers.0"}, 1),
        ({"hook_name": "transformer.h.11"}, 12),
        (
            {
                "hook_name": "blocks.4.hook_resid_post",
                "metadata": {"hook_name": "blocks.4.hook_resid_post"},
            },
            5,
        ),
        ({}, None),  # no hook at all: the caller must be given a layer
    ],
)
def test_hook_layer_of_each_hook_form(tmp_path: Path, hook: dict[str, Any], layer: int | None):
    sae = load_sae(write_sae(tmp_path / "sae", **hook))
    assert sae.hook_layer == layer


@pytest.mark.parametrize(
    ("hook", "field", "value"),
    [
        (
            {"metadata": {"hook_name": "blocks.3.attn.hook_z"}},
            "metadata.hook_name",
            "blocks.3.attn.hook_z",
        ),
        (
            {"hook_name": "blocks.3.hook_mlp_out", "hook_layer": 3},
            "hook_name",
            "blocks.3.hook_mlp_out",
        ),
        ({"hook_name": "blocks.3.hook_attn_out"}, "hook_name", "blocks.3.hook_attn_out"),
        ({"hook_name": "blocks.3.hook_resid_mid"}, "hook_name", "blocks.3.hook_resid_mid"),
        ({"hook_name": "model.layers.3.mlp"}, "hook_name", "model.layers.3.mlp"),
        ({"hook_name": "blocks.0.hook_resid_pre"}, "hook_name", "blocks.0.hook_resid_pre"),
        ({"hook_name": 7}, "hook_name", "7"),
        ({"hook_name": "blocks.5.hook_resid_post", "hook_layer": 4}, "hook_layer", "4"),
        ({"hook_layer": 4}, "hook_layer", "4"),
        (
            {"hook_name": "blocks.5.hook_resid_post", "hook_head_index": 2},
            "hook_head_index",
            "2",
        ),
    ],
)
def test_hooks_the_monitor_cannot_read_are_refused_naming_file_field_and_value(
    tmp_path: Path, hook: dict[str, Any], field: str, value: str
):
    path = write_sae(tmp_path / "sae", **hook)
    with pytest.raises(SAEError) as err:
        load_sae(path)
    message = str(err.value)
    assert str(path / "cfg.json") in message
    assert repr(field) in message
    assert value in message


def test_the_same_hook_given_twice_differently_is_refused(tmp_path: Path):
    path = write_sae(
        tmp_path / "sae",
        hook_name="blocks.5.hook_resid_post",
        metadata={"hook_name": "blocks.9.hook_resid_post"},
    )
    with pytest.raises(SAEError, match=r"cfg\.json: the hook is given twice") as err:
        load_sae(path)
    assert "metadata.hook_name='blocks.9.hook_resid_post'" in str(err.value)


# ---- fields that change the maths, against hand computations -----------------------------------


def test_rescale_acts_by_decoder_norm_is_computed_as_saelens_defines_it(tmp_path: Path):
    w = weights()
    sae = load_sae(write_sae(tmp_path / "sae", w, rescale_acts_by_decoder_norm=True))
    x = inputs()
    norms = w["W_dec"].norm(dim=1)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = topk_relu(pre * norms)  # ranked after scaling by each decoder row's norm
    x_hat = (f / norms) @ w["W_dec"] + w["b_dec"]
    assert not torch.equal(f > 0, topk_relu(pre) > 0), "the test needs rescaling to matter"
    feats = sae.encode(x)
    torch.testing.assert_close(feats.to_dense(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(feats), x_hat, rtol=1e-5, atol=1e-5)
    picked = torch.tensor([0, 5, 23])
    torch.testing.assert_close(sae.feature_values(x, picked), f[:, picked], rtol=1e-5, atol=1e-5)
    assert torch.equal(sae.stored["W_dec"], w["W_dec"]), "the stored tensors stay as given"


def test_rescale_acts_by_decoder_norm_outside_topk_is_refused(tmp_path: Path):
    path = write_sae(
        tmp_path / "sae", architecture="standard", k=None, rescale_acts_by_decoder_norm=True
    )
    with pytest.raises(SAEError, match=r"cfg\.json: field 'rescale_acts_by_decoder_norm' is true"):
        load_sae(path)


def _expected_average(w: dict[str, Tensor], x: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """Trained on ``s * x``: features of the scaled input, reconstruction scaled back."""
    f = topk_relu((x * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    return f, (f @ w["W_dec"] + w["b_dec"]) / s


def test_expected_average_only_in_with_its_scale_in_cfg(tmp_path: Path):
    w, s = weights(), 0.25
    path = write_sae(
        tmp_path / "sae", w, normalize_activations="expected_average_only_in", norm_scaling_factor=s
    )
    sae, x = load_sae(path), inputs()
    f, x_hat = _expected_average(w, x, s)
    feats = sae.encode(x)
    torch.testing.assert_close(feats.to_dense(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(feats), x_hat, rtol=1e-5, atol=1e-5)


def test_expected_average_only_in_with_saelens_activation_scaler_json(tmp_path: Path):
    w, s = weights(), 3.0
    path = write_sae(tmp_path / "sae", w, normalize_activations="expected_average_only_in")
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    sae, x = load_sae(path), inputs()
    f, x_hat = _expected_average(w, x, s)
    feats = sae.encode(x)
    torch.testing.assert_close(feats.to_dense(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(feats), x_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", ["expected_average_only_in", True])
def test_expected_average_only_in_without_a_scale_is_refused(tmp_path: Path, value: object):
    path = write_sae(tmp_path / "sae", normalize_activations=value)
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))
    with pytest.raises(SAEError) as err:
        load_sae(path)
    assert str(path / "cfg.json") in str(err.value)
    assert f"field 'normalize_activations' is {value!r} with no scale" in str(err.value)


def test_constant_norm_rescale_scales_each_token_to_norm_sqrt_d_in_and_back(tmp_path: Path):
    w = weights()
    path = write_sae(
        tmp_path / "sae",
        w,
        architecture="standard",
        k=None,
        normalize_activations="constant_norm_rescale",
    )
    sae, x = load_sae(path), inputs()
    assert isinstance(sae, StandardSAE)
    coeff = math.sqrt(D_IN) / x.norm(dim=1, keepdim=True)
    f = torch.relu((x * coeff - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    x_hat = (f @ w["W_dec"] + w["b_dec"]) / coeff
    feats = sae.encode(x)
    torch.testing.assert_close(feats.to_dense(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(feats, x), x_hat, rtol=1e-5, atol=1e-5)
    with pytest.raises(SAEError, match=r"decode\(feats, inputs\) needs the activations"):
        sae.decode(feats)
    torch.testing.assert_close(sae.output_scale(x), 1 / coeff)


def test_layer_norm_centres_and_divides_by_the_bessel_std_plus_eps(tmp_path: Path):
    w = weights(threshold=True)
    path = write_sae(
        tmp_path / "sae", w, architecture="jumprelu", k=None, normalize_activations="layer_norm"
    )
    sae, x = load_sae(path), inputs()
    assert isinstance(sae, JumpReLUSAE)
    mu = x.sum(dim=1, keepdim=True) / D_IN
    std = (((x - mu) ** 2).sum(dim=1, keepdim=True) / (D_IN - 1)).sqrt()
    pre = ((x - mu) / (std + 1e-5) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = torch.where(pre > w["threshold"], torch.relu(pre), torch.zeros_like(pre))
    x_hat = (f @ w["W_dec"] + w["b_dec"]) * std + mu
    assert bool((f > 0).any())
    feats = sae.encode(x)
    torch.testing.assert_close(feats.to_dense(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(feats, x), x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.feature_values(x, torch.arange(D_SAE)), f, rtol=1e-5, atol=1e-5)
    # a change d in the decoder's output moves the residual by d * std
    torch.testing.assert_close(sae.output_scale(x), std)


def test_apply_b_dec_to_input_false_leaves_the_input_alone(tmp_path: Path):
    w = weights()
    sae = load_sae(write_sae(tmp_path / "sae", w, apply_b_dec_to_input=False))
    x = inputs()
    torch.testing.assert_close(
        sae.encode(x).to_dense(), topk_relu(x @ w["W_enc"] + w["b_enc"]), rtol=1e-5, atol=1e-5
    )


def test_older_standard_architecture_with_a_topk_activation_is_topk(tmp_path: Path):
    w = weights()
    path = write_sae(
        tmp_path / "sae",
        w,
        architecture="standard",
        k=None,
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 3},
    )
    sae, x = load_sae(path), inputs()
    assert isinstance(sae, TopKSAE)
    assert sae.k == 3
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.encode(x).to_dense(), topk_relu(pre, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"normalize_activations": "batch_norm"}, "normalize_activations"),
        ({"norm_scaling_factor": 2.0}, "norm_scaling_factor"),
        (
            {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": -1},
            "norm_scaling_factor",
        ),
        ({"reshape_activations": "hook_z"}, "reshape_activations"),
        ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor"),
        ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input"),
        (
            {"architecture": "standard", "k": None, "activation_fn_str": "tanh-relu"},
            "activation_fn_str",
        ),
        ({"activation_fn": "relu"}, "activation_fn"),  # relu activation, topk architecture
        ({"activation_fn_kwargs": {"k": 4, "postact_fn": "gelu"}}, "activation_fn_kwargs"),
        ({"k": 4, "activation_fn_kwargs": {"k": 5}}, "k"),
        ({"k": 0}, "k"),
    ],
)
def test_maths_fields_the_monitor_cannot_honour_are_refused(
    tmp_path: Path, cfg: dict[str, Any], field: str
):
    path = write_sae(tmp_path / "sae", **cfg)
    with pytest.raises(SAEError) as err:
        load_sae(path)
    assert str(path / "cfg.json") in str(err.value)
    assert field in str(err.value)


def test_a_tensor_the_architecture_does_not_use_is_refused(tmp_path: Path):
    path = write_sae(tmp_path / "sae", {**weights(), "scaling_factor": torch.full((D_SAE,), 2.0)})
    with pytest.raises(
        SAEError, match=r"sae_weights\.safetensors: tensor\(s\) scaling_factor are not part"
    ):
        load_sae(path)
    # all ones is the identity, as SAELens treats it: dropped
    write_sae(path, {**weights(), "scaling_factor": torch.ones(D_SAE)})
    assert set(load_sae(path).stored) == {"W_enc", "b_enc", "W_dec", "b_dec"}


# ---- compute dtype ----------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_a_half_precision_file_is_computed_in_fp32_on_cpu(tmp_path: Path, stored: torch.dtype):
    w = weights()
    sae = load_sae(write_sae(tmp_path / "sae", w, dtype=stored))
    assert all(t.dtype == stored for t in sae.stored.values()), "stored bits kept as given"
    sae.to("cpu", dtype=torch.bfloat16)  # asked for less: CPU stays fp32
    assert sae.dtype == torch.float32
    assert all(sae.tensor(n).dtype == torch.float32 for n in sae.stored)
    x = inputs()
    up = {n: t.to(stored).float() for n, t in w.items()}
    f = topk_relu((x - up["b_dec"]) @ up["W_enc"] + up["b_enc"])
    feats = sae.encode(x)
    assert feats.values.dtype == torch.float32
    torch.testing.assert_close(feats.to_dense(), f, rtol=1e-5, atol=1e-5)
    assert sae.decode(feats).dtype == torch.float32


def test_an_unknown_compute_dtype_is_refused(tmp_path: Path):
    sae: SparseAutoencoder = load_sae(write_sae(tmp_path / "sae"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        sae.to("cpu", dtype="int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        sae.to("cpu", dtype=torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_computes_in_the_dtype_asked_and_returns_fp32(tmp_path: Path, dtype: torch.dtype):
    sae = load_sae(write_sae(tmp_path / "sae", rescale_acts_by_decoder_norm=True))
    x = inputs(256)
    reference = sae.to("cuda").encode(x).to("cpu").to_dense()
    assert sae.dtype == torch.float32
    sae.to("cuda", dtype=dtype)
    assert sae.dtype == dtype
    assert sae.tensor("W_enc").dtype == dtype
    feats = sae.encode(x)
    assert feats.values.dtype == torch.float32
    assert sae.decode(feats).dtype == torch.float32
    # half precision may swap near-ties; most activations agree closely
    close = torch.isclose(feats.to("cpu").to_dense(), reference, rtol=2e-2, atol=2e-2)
    assert close.float().mean() > 0.97
