"""Connectors: output shapes, official key layout, the resampler's fixed output length, and registration."""

from __future__ import annotations

import pytest
import torch

from mmcompose.errors import MMComposeError
from mmcompose.modalities import build_connector


@pytest.mark.parametrize("tokens", [5, 50])
def test_shapes(tokens: int) -> None:
    x = torch.randn(3, tokens, 12)
    assert build_connector("linear", 12, 20)(x).shape == (3, tokens, 20)
    assert build_connector("mlp2x_gelu", 12, 20)(x).shape == (3, tokens, 20)
    assert build_connector("resampler", 12, 20, num_queries=7, width=16, num_heads=2)(x).shape == (3, 7, 20)


def test_mlp_keys_follow_llava_and_modelcompose() -> None:
    assert sorted(build_connector("mlp2x_gelu", 4, 8).state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_resampler_queries_attend_to_every_token() -> None:
    resampler = build_connector("resampler", 6, 8, num_queries=3, width=8, num_heads=2)
    x = torch.randn(1, 10, 6, requires_grad=True)
    resampler(x).sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()  # every input token influences the queries


def test_bad_connector_requests() -> None:
    with pytest.raises(MMComposeError, match="unknown connector type 'no-such-connector'"):
        build_connector("no-such-connector", 4, 8)
    with pytest.raises(MMComposeError, match="bad options"):
        build_connector("linear", 4, 8, depth=2)


def test_the_qformer_connector_trains() -> None:
    """Every parameter of the Q-Former gets a gradient (dropout on, as BERT trains), and a few steps fit a target."""
    torch.manual_seed(0)
    connector = build_connector("qformer", 12, 8, num_queries=3, num_layers=2, width=16, num_heads=4,
                                intermediate_size=20, num_positions=10, dropout=0.1)
    tokens, target = torch.randn(4, 10, 12), torch.randn(4, 3, 8)
    connector(tokens).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
    optimizer = torch.optim.Adam(connector.parameters(), lr=1e-2)
    connector.eval()
    before = torch.nn.functional.mse_loss(connector(tokens), target).item()
    connector.train()
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(connector(tokens), target).backward()
        optimizer.step()
    connector.eval()
    assert torch.nn.functional.mse_loss(connector(tokens), target).item() < 0.5 * before
    with pytest.raises(ValueError, match="the Q-Former has 10 positions but got 11 encoder tokens"):
        connector(torch.randn(1, 11, 12))
