"""SAEs: each architecture's encode equals its formula; SAELens format round-trips; bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from monitor.sae import (
    ARCHITECTURES,
    JumpReLUSAE,
    SAEError,
    SparseActivations,
    SparseAutoencoder,
    StandardSAE,
    TopKSAE,
    load_sae,
    save_sae,
)
from monitor.sae import base as sae_base

D_IN, D_SAE, K = 16, 64, 5


def make_sae(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen),
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen),
        "b_dec": torch.randn(D_IN, generator=gen) * 0.1,
    }
    cfg: dict[str, Any] = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE}
    if arch == "jumprelu":
        tensors["threshold"] = torch.rand(D_SAE, generator=gen) * 2
    if arch == "topk":
        cfg["k"] = K
    return ARCHITECTURES[arch](cfg, {n: t.to(dtype) for n, t in tensors.items()})


def formula(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """The published encoder formulas, written out densely."""
    w = {n: t.float() for n, t in sae.stored.items()}
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if isinstance(sae, StandardSAE):
        return torch.relu(pre)
    if isinstance(sae, JumpReLUSAE):
        return torch.where(pre > w["threshold"], torch.relu(pre), torch.zeros_like(pre))
    assert isinstance(sae, TopKSAE)
    values, indices = pre.topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_encode_equals_the_architecture_formula(arch: str):
    sae = make_sae(arch)
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(1))
    feats = sae.encode(x)
    assert isinstance(feats, SparseActivations)
    assert feats.n_tokens == 50
    assert bool((feats.values > 0).all()), "only positive activations are kept"
    torch.testing.assert_close(feats.to_dense(), formula(sae, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_encode_in_chunks_equals_encode_at_once(arch: str, monkeypatch: pytest.MonkeyPatch):
    sae = make_sae(arch)
    x = torch.randn(23, D_IN, generator=torch.Generator().manual_seed(2))
    whole = sae.encode(x).to_dense()
    monkeypatch.setattr(sae_base, "ENCODE_CHUNK", 4)
    chunked = sae.encode(x)
    # a matmul over fewer rows may sum in another order: equal up to fp32 rounding
    torch.testing.assert_close(chunked.to_dense(), whole, rtol=1e-6, atol=1e-5)


def test_topk_keeps_at_most_k_per_token():
    sae = make_sae("topk")
    feats = sae.encode(torch.randn(40, D_IN))
    counts = feats.indptr[1:] - feats.indptr[:-1]
    assert int(counts.max()) <= K
    assert int(counts.sum()) == feats.nnz


def test_sparse_decode_equals_dense_decode():
    sae = make_sae("standard")
    x = torch.randn(12, D_IN)
    feats = sae.encode(x)
    expected = feats.to_dense() @ sae.stored["W_dec"] + sae.stored["b_dec"]
    torch.testing.assert_close(sae.decode(feats), expected, rtol=1e-5, atol=1e-5)


def test_encode_of_no_tokens_is_empty():
    feats = make_sae("topk").encode(torch.zeros(0, D_IN))
    assert feats.n_tokens == 0
    assert feats.nnz == 0


def test_encode_rejects_the_wrong_width():
    with pytest.raises(ValueError, match=rf"\[tokens, {D_IN}\]"):
        make_sae("topk").encode(torch.zeros(3, D_IN + 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_save_then_load_round_trips_bit_exactly(arch: str, dtype: torch.dtype, tmp_path: Path):
    sae = make_sae(arch, dtype)
    save_sae(sae, tmp_path / "a")
    loaded = load_sae(tmp_path / "a")
    assert type(loaded) is type(sae)
    assert loaded.cfg == json.loads((tmp_path / "a" / "cfg.json").read_text())
    for name, tensor in sae.stored.items():
        assert loaded.stored[name].dtype == dtype
        assert torch.equal(loaded.stored[name], tensor), name
    save_sae(loaded, tmp_path / "b")
    for f in ("cfg.json", "sae_weights.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    x = torch.randn(9, D_IN)
    assert torch.equal(loaded.encode(x).to_dense(), sae.encode(x).to_dense())


def test_saved_files_follow_the_saelens_layout(tmp_path: Path):
    save_sae(make_sae("jumprelu", torch.float16), tmp_path)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    assert {n: list(t.shape) for n, t in tensors.items()} == {
        "W_enc": [D_IN, D_SAE],
        "b_enc": [D_SAE],
        "W_dec": [D_SAE, D_IN],
        "b_dec": [D_IN],
        "threshold": [D_SAE],
    }
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (
        "jumprelu",
        D_IN,
        D_SAE,
        "float16",
    )


def _saved(tmp_path: Path, arch: str = "topk") -> Path:
    return save_sae(make_sae(arch), tmp_path / "sae")


def test_d_in_not_matching_the_model_names_the_file(tmp_path: Path):
    path = _saved(tmp_path)
    with pytest.raises(SAEError) as err:
        load_sae(path, expected_d_in=576)
    assert str(path / "cfg.json") in str(err.value)
    assert "d_in is 16" in str(err.value)
    assert "576" in str(err.value)


def test_missing_tensor_names_the_file_and_tensor(tmp_path: Path):
    path = _saved(tmp_path)
    weights = path / "sae_weights.safetensors"
    tensors = load_file(weights)
    del tensors["W_dec"]
    save_file(tensors, weights)
    with pytest.raises(SAEError, match=r"sae_weights\.safetensors: tensor\(s\) W_dec missing"):
        load_sae(path)


def test_jumprelu_without_threshold_is_refused(tmp_path: Path):
    path = _saved(tmp_path, "jumprelu")
    weights = path / "sae_weights.safetensors"
    tensors = load_file(weights)
    del tensors["threshold"]
    save_file(tensors, weights)
    with pytest.raises(SAEError, match="threshold missing for architecture 'jumprelu'"):
        load_sae(path)


def _rewrite_cfg(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_unknown_architecture_names_the_file(tmp_path: Path):
    path = _saved(tmp_path)
    _rewrite_cfg(path, architecture="gated")
    with pytest.raises(SAEError) as err:
        load_sae(path)
    assert str(path / "cfg.json") in str(err.value)
    assert "'gated' is not one of jumprelu, standard, topk" in str(err.value)


def test_tensor_shape_not_matching_cfg_names_the_directory(tmp_path: Path):
    path = _saved(tmp_path)
    _rewrite_cfg(path, d_sae=D_SAE * 2)
    with pytest.raises(SAEError, match=rf"{path}: tensor W_enc has shape \[16, 64\]"):
        load_sae(path)


def test_topk_without_k_is_refused(tmp_path: Path):
    path = _saved(tmp_path)
    _rewrite_cfg(path, k=None)
    with pytest.raises(SAEError, match="field 'k'"):
        load_sae(path)


def test_missing_files_are_named(tmp_path: Path):
    with pytest.raises(SAEError, match="no such SAE directory"):
        load_sae(tmp_path / "nowhere")
    path = _saved(tmp_path)
    (path / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEError, match=r"sae_weights\.safetensors: missing"):
        load_sae(path)
    (path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match=r"cfg\.json: not valid JSON"):
        load_sae(path)


def test_legacy_saelens_config_is_understood(tmp_path: Path):
    """Older SAELens configs name the activation function and carry k in its kwargs."""
    path = _saved(tmp_path)
    _rewrite_cfg(
        path,
        architecture=None,
        k=None,
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 3},
        hook_name="blocks.14.hook_resid_post",
        hook_layer=14,
    )
    sae = load_sae(path)
    assert isinstance(sae, TopKSAE)
    assert sae.k == 3
    assert sae.hook_layer == 15, "resid_post of block 14 is the residual after 15 layers"


def test_unsupported_activation_normalisation_is_refused(tmp_path: Path):
    path = _saved(tmp_path)
    _rewrite_cfg(path, normalize_activations="expected_average_only_in")
    with pytest.raises(SAEError, match="normalize_activations"):
        load_sae(path)


def test_keep_mask_drops_massive_activations_only_when_the_sae_records_a_limit():
    sae = make_sae("topk")
    x = torch.randn(4, D_IN)
    x[2] *= 1000
    assert sae.keep_mask(x).tolist() == [True] * 4
    limited = TopKSAE({**sae.cfg, "exclude_norm_above": 100.0}, sae.stored)
    assert limited.keep_mask(x).tolist() == [True, True, False, True]
