"""Steering: clamps parsed and resolved, the clamp applied exactly as Scaling Monosemanticity
defines it for every SAE architecture, and on the real SmolLM2 through ``generate``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from test_sae import D_IN, D_SAE, formula, make_sae
from torch import nn
from typer.testing import CliRunner

from monitor.cli import app as cli
from monitor.config import Settings
from monitor.generation import Generator
from monitor.messages import Message
from monitor.sae import ARCHITECTURES
from monitor.steering import Clamp, Steerer, SteeringError, parse_clamp, resolve

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]  # fmt: skip


def test_clamps_parse_and_bad_ones_are_named() -> None:
    assert parse_clamp("6168=5x") == Clamp(6168, 5.0, relative=True)
    assert parse_clamp(" 6168 = 0 ") == Clamp(6168, 0.0)
    assert parse_clamp("12=-1.5e1") == Clamp(12, -15.0)
    assert str(parse_clamp("6168=2.5x")) == "6168=2.5x"
    for bad in ("6168", "abc=1", "6168=x", "6168=1y", "=3", "-1=2", "6168=inf"):
        with pytest.raises(SteeringError, match="clamp"):
            parse_clamp(bad)


def test_resolve_checks_features_and_the_atlas() -> None:
    sae = make_sae("topk")
    atlas = np.arange(D_SAE, dtype=np.float32)
    assert resolve([parse_clamp("3=2x"), parse_clamp("5=0.5")], sae, atlas) == {3: 6.0, 5: 0.5}
    with pytest.raises(SteeringError, match=rf"unknown feature {D_SAE}; .* 0\.\.{D_SAE - 1}"):
        resolve([parse_clamp(f"{D_SAE}=1")], sae, atlas)
    with pytest.raises(SteeringError, match="atlas"):
        resolve([parse_clamp("3=2x")], sae, None)
    with pytest.raises(SteeringError, match="twice"):
        resolve([parse_clamp("3=1"), parse_clamp("3=2")], sae, atlas)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_clamp_is_decode_of_the_clamped_features_plus_the_error(arch: str, device: str) -> None:
    """x' = decode(f with the clamped features set) + (x - decode(f)): computed sparsely, equal
    to the dense definition, on every architecture."""
    sae = make_sae(arch).to(device)
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1)).to(device)
    values = {3: 4.0, 17: 0.0, 40: 1.5}
    steered = Steerer(sae, nn.Identity(), values, prompt=True).steer(x)
    w_dec, b_dec = sae.tensor("W_dec"), sae.tensor("b_dec")
    f = formula(sae, x.cpu()).to(device)
    clamped = f.clone()
    for feature, value in values.items():
        clamped[:, feature] = value
    expected = clamped @ w_dec + b_dec + (x - (f @ w_dec + b_dec))
    assert torch.allclose(steered, expected, atol=1e-4)
    assert not torch.allclose(steered, x), "the clamp changed something"
    # Holding features at the values they already have changes nothing.
    same = {i: float(v) for i, v in zip(range(3), f[0, :3].tolist(), strict=True)}
    assert torch.allclose(Steerer(sae, nn.Identity(), same, True).steer(x[:1]), x[:1], atol=1e-5)
    picked = torch.tensor([3, 17, 40], device=device)
    assert torch.allclose(sae.feature_values(x, picked), f[:, picked], atol=1e-5)


@pytest.fixture(scope="module")
def generator() -> Iterator[Generator]:
    yield Generator.from_settings(Settings())


ASK = [Message(role="user", content="Write a one-line note to a colleague about lunch.")]


@pytest.mark.slow
def test_a_clamp_changes_the_answer_and_prompt_positions_only_when_asked(
    generator: Generator,
) -> None:
    plain = generator.generate(ASK, max_new_tokens=12)
    again = generator.generate(ASK, max_new_tokens=12)
    assert plain.text == again.text and plain.new_tokens == 12, "greedy is deterministic"
    steered = generator.generate(ASK, 12, steerer=generator.steerer([parse_clamp("6168=2x")]))
    assert steered.text != plain.text
    assert generator.generate(ASK, 12).text == plain.text, "the hook is gone afterwards"
    text = ["The library opens at ten on Saturdays and closes at four."]
    off = generator.mean_loss(text)
    # A single forward pass is a generation's prompt pass: untouched unless asked.
    unasked = generator.steerer([parse_clamp("6168=2x")])
    asked = generator.steerer([parse_clamp("6168=2x")], prompt=True)
    assert generator.mean_loss(text, unasked) == pytest.approx(off, abs=1e-6)
    assert generator.mean_loss(text, asked) > off + 0.01


@pytest.mark.slow
def test_generate_command_compares_and_refuses_bad_clamps(generator: Generator) -> None:
    r = CliRunner().invoke(
        cli, ["generate", "Say hello.", "--clamp", "6168=2x", "--compare", "--json",
              "--max-new-tokens", "8"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["clamp"] == ["6168=2x"] and doc["layer"] == generator.layer
    assert doc["steered"]["text"] != doc["unsteered"]["text"]
    assert doc["steered"]["new_tokens"] <= 8
    for args, message in (
        (["--clamp", "6168"], "expected FEATURE=VALUE"),
        (["--clamp", "99999=1"], "unknown feature 99999"),
    ):
        r = CliRunner().invoke(cli, ["generate", "Hi", "--max-new-tokens", "4", *args])
        assert r.exit_code == 2 and message in r.output, r.output
    r = CliRunner().invoke(cli, ["generate"])
    assert r.exit_code == 2 and "give a PROMPT or --messages" in r.output


@pytest.mark.slow
def test_a_model_without_an_sae_refuses_clamps(generator: Generator) -> None:
    bare = Generator(generator.loaded, None, generator.layer)
    assert bare.steerer([]) is None
    with pytest.raises(SteeringError, match="no trained SAE"):
        bare.steerer([parse_clamp("6168=0")])
