"""CCF-LLM's equations on small tensors, against computations written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ccfllm.methods.ccf_llm import Alignment, Gate, ccf_loss, click_score, fuse


def gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def set_linear(layer: nn.Linear, weight: list[list[float]], bias: list[float]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))


def test_gate_and_fusion_follow_eqs_3_and_4_dimension_by_dimension():
    gate = Gate(llm_dim=2, hidden=1)
    set_linear(gate.from_cf[0], [[1.0, 2.0]], [0.5])
    set_linear(gate.from_cf[2], [[1.0], [-1.0]], [0.0, 0.25])
    set_linear(gate.from_text[0], [[-1.0, 1.0]], [0.0])
    set_linear(gate.from_text[2], [[2.0], [0.5]], [0.1, 0.0])
    aligned_cf, token = torch.tensor([[0.2, -0.4]]), torch.tensor([[1.0, 3.0]])

    h_cf = gelu(1.0 * 0.2 + 2.0 * -0.4 + 0.5)  # MLP_G1 hidden unit
    h_text = gelu(-1.0 * 1.0 + 1.0 * 3.0)  # MLP_G2 hidden unit
    alpha = [h_cf + 2.0 * h_text + 0.1, -h_cf + 0.25 + 0.5 * h_text]  # Eq. 3, one weight per dimension
    fused = [1.0 + alpha[0] * 0.2, 3.0 + alpha[1] * -0.4]  # Eq. 4

    computed_alpha = gate(aligned_cf, token)
    torch.testing.assert_close(computed_alpha, torch.tensor([alpha]))
    torch.testing.assert_close(fuse(token, aligned_cf, computed_alpha), torch.tensor([fused]))


def test_gate_starts_closed_and_the_ablations_have_their_shapes():
    token, aligned = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.equal(Gate(8, 4)(aligned, token), torch.zeros(5, 8))  # fused == title token at init
    assert torch.equal(Gate(8, 4, mode="alpha-one")(aligned, token), torch.ones(5, 1))
    assert Gate(8, 4, mode="alpha-scalar")(aligned, token).shape == (5, 1)  # one weight per token


def test_alignment_maps_cf_dimension_to_llm_dimension():
    assert Alignment(cf_dim=130, hidden=16, llm_dim=48)(torch.randn(3, 130)).shape == (3, 48)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        # y = 1: -log 0.6 - log(1 - 0.3) + 2 * -log sigmoid(0.6 - 0.3)
        (1.0, -math.log(0.6) - math.log(0.7) - 2 * math.log(1 / (1 + math.exp(-0.3)))),
        # y = 0: -log(1 - 0.6) - log 0.3 + 2 * -log sigmoid(0.3 - 0.6)
        (0.0, -math.log(0.4) - math.log(0.3) - 2 * math.log(1 / (1 + math.exp(0.3)))),
    ],
)
def test_loss_eq_5_on_known_probabilities(label, expected):
    log_yes, log_no = torch.log(torch.tensor([0.6])), torch.log(torch.tensor([0.3]))
    loss = ccf_loss(log_yes, log_no, torch.tensor([label]), k=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(
        1.976211 if label else 3.828974, rel=1e-6
    )  # worked out with a calculator


def test_loss_is_stable_at_extreme_probabilities_and_score_is_normalised_p_yes():
    log_yes = torch.tensor([-1e-9, -60.0], requires_grad=True)
    log_no = torch.tensor([-60.0, -1e-9])
    loss = ccf_loss(log_yes, log_no, torch.tensor([1.0, 0.0]), k=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_yes.grad).all()
    score = click_score(torch.log(torch.tensor([0.6])), torch.log(torch.tensor([0.3])))
    assert score.item() == pytest.approx(0.6 / 0.9)
