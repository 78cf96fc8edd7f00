"""Losses: hand-computed values, finite-difference gradients, invariances."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qprobe.catalog import LOSSES  # noqa: E402
from qprobe.errors import ConfigError  # noqa: E402
from qprobe.probes.losses import (  # noqa: E402
    bt_loss,
    ce_loss,
    dpo_loss,
    listwise_loss,
    loss_kind,
    margin_bt_loss,
    mse_loss,
    pg_loss,
)

LN3 = math.log(3.0)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------- registry
def test_every_registered_loss_declares_its_kind() -> None:
    kinds = {name: loss_kind(LOSSES.get(name)) for name in LOSSES.names()}
    assert kinds == {"mse": "pointwise", "ce": "pointwise", "pg": "grouped", "listwise": "grouped",
                     "bt": "pairwise", "dpo": "pairwise", "margin_bt": "pairwise"}


def test_loss_without_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="kind"):
        loss_kind(lambda s, r: s)


# ---------------------------------------------------------------------- literal values
def test_mse_values() -> None:
    assert mse_loss(t([1.0, 2.0]), t([0.0, 1.0])).item() == pytest.approx(1.0)
    assert mse_loss(t([[1.0, 3.0]]), t([[0.0, 0.0]])).item() == pytest.approx(5.0)
    masked = mse_loss(t([[1.0, 3.0]]), t([[0.0, 0.0]]), torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(1.0)


def test_ce_values() -> None:
    value = ce_loss(t([0.0, LN3]), t([0.0, 1.0])).item()
    assert value == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        ce_loss(t([0.0]), t([2.0]))


def test_pg_values() -> None:
    s, r = t([[0.0, LN3]]), t([[0.0, 1.0]])  # softmax = [1/4, 3/4]
    assert pg_loss(s, r).item() == pytest.approx(-0.75)
    assert pg_loss(s, r, baseline=0.5).item() == pytest.approx(-(-0.5 * 0.25 + 0.5 * 0.75))
    assert pg_loss(s, r, baseline="mean").item() == pytest.approx(-0.25)
    assert pg_loss(s, r, beta=0.5).item() == pytest.approx(-0.9)  # softmax(2s) = [1/10, 9/10]
    two = pg_loss(t([[0.0, LN3], [0.0, 0.0]]), t([[0.0, 1.0], [1.0, 1.0]]))
    assert two.item() == pytest.approx((-0.75 - 1.0) / 2)  # mean over groups
    ragged = pg_loss(t([[0.0, LN3, 100.0]]), t([[0.0, 1.0, 1.0]]), torch.tensor([[True, True, False]]))
    assert ragged.item() == pytest.approx(-0.75)
    assert pg_loss(t([0.0, LN3]), t([0.0, 1.0])).item() == pytest.approx(-0.75)  # 1-D = one group


def test_listwise_values() -> None:
    # target softmax([1, 0] / 0.01) ~ [1, 0]; policy [1/2, 1/2]: KL = log 2, reward range 1
    assert listwise_loss(t([[0.0, 0.0]]), t([[1.0, 0.0]]), tau=0.01).item() == pytest.approx(math.log(2))
    assert listwise_loss(t([[0.0, 5.0]]), t([[1.0, 1.0]])).item() == pytest.approx(0.0)  # no information
    # weighted by the range: rewards [2, 0] with tau 0.02 is the same target, twice the weight
    assert listwise_loss(t([[0.0, 0.0]]), t([[2.0, 0.0]]), tau=0.02).item() == pytest.approx(2 * math.log(2))


def test_pairwise_values() -> None:
    assert bt_loss(t([0.0]), t([0.0])).item() == pytest.approx(math.log(2))
    assert bt_loss(t([LN3, 0.0]), t([0.0, 0.0])).item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
    assert margin_bt_loss(t([10.0]), t([0.0])).item() == pytest.approx(math.log(2))  # 0.2 * 10 - 2 = 0
    assert margin_bt_loss(t([1.0]), t([0.0]), beta=1.0, gamma=0.0).item() == pytest.approx(-logsig(1.0))
    assert dpo_loss(t([0.0]), t([0.0])).item() == pytest.approx(math.log(2))
    assert dpo_loss(t([LN3]), t([0.0])).item() == pytest.approx(-logsig(0.5))  # rho 3/4 vs 1/4
    with_others = dpo_loss(t([LN3]), t([0.0]), t([[math.log(4.0)]]))  # 3/8 vs 1/8
    assert with_others.item() == pytest.approx(-logsig(0.25))
    masked = dpo_loss(t([LN3]), t([0.0]), t([[math.log(4.0), 9.0]]), torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(-logsig(0.25))
    assert dpo_loss(t([LN3]), t([0.0]), alpha=2.0).item() == pytest.approx(-logsig(1.0))


# --------------------------------------------------------------------------- gradients
GRADCHECKS = {
    "mse": lambda s, r, m: mse_loss(s, r, m),
    "ce": lambda s, r, m: ce_loss(s, r.clamp(0, 1), m),
    "pg": lambda s, r, m: pg_loss(s, r, m, beta=0.7, baseline="mean"),
    "listwise": lambda s, r, m: listwise_loss(s, r, m, beta=0.7, tau=0.5),
    "bt": lambda s, r, m: bt_loss(s[:, 0], s[:, 1]),
    "margin_bt": lambda s, r, m: margin_bt_loss(s[:, 0], s[:, 1]),
    "dpo": lambda s, r, m: dpo_loss(s[:, 0], s[:, 1], s[:, 2:], m[:, 2:], alpha=2.0, beta=0.5),
}


@pytest.mark.parametrize("name", sorted(GRADCHECKS))
def test_gradients_match_finite_differences(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    r = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    m = torch.tensor([[True] * 5, [True, True, True, False, True], [True] * 4 + [False]])
    assert torch.autograd.gradcheck(lambda x: GRADCHECKS[name](x, r, m), (s,))


# --------------------------------------------------------------------------- invariances
finite = st.floats(-3, 3, allow_nan=False)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=6), finite, st.floats(0.2, 3))
def test_pg_gradient_ignores_a_constant_added_to_a_groups_rewards(pairs, shift, beta) -> None:
    s = t([[a for a, _ in pairs]]).requires_grad_()
    r = t([[b for _, b in pairs]])
    g1 = torch.autograd.grad(pg_loss(s, r, beta=beta), s)[0]
    g2 = torch.autograd.grad(pg_loss(s, r + shift, beta=beta), s)[0]
    assert torch.allclose(g1, g2, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=6), finite)
def test_within_group_losses_ignore_per_group_offsets(pairs, shift) -> None:
    s, r = t([[a for a, _ in pairs]]), t([[b for _, b in pairs]])
    for fn in (pg_loss, listwise_loss):
        assert fn(s + shift, r).item() == pytest.approx(fn(s, r).item(), abs=1e-9)
    assert listwise_loss(s, r + shift).item() == pytest.approx(listwise_loss(s, r).item(), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=6), finite)
def test_pairwise_losses_ignore_a_constant_added_to_both_scores(pairs, shift) -> None:
    c, r = t([a for a, _ in pairs]), t([b for _, b in pairs])
    for fn in (bt_loss, margin_bt_loss, dpo_loss):
        assert fn(c + shift, r + shift).item() == pytest.approx(fn(c, r).item(), abs=1e-9)


# --------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="same shape"):
        pg_loss(t([[0.0, 1.0]]), t([[0.0]]))
    with pytest.raises(ConfigError, match="empty group"):
        pg_loss(t([[0.0, 1.0]]), t([[0.0, 1.0]]), torch.tensor([[False, False]]))
    with pytest.raises(ConfigError, match="torch tensors"):
        mse_loss([1.0], [1.0])
    with pytest.raises(ConfigError, match="1-D"):
        bt_loss(t([[0.0]]), t([[0.0]]))
    with pytest.raises(ConfigError, match="beta > 0"):
        pg_loss(t([0.0]), t([0.0]), beta=0.0)
    with pytest.raises(ConfigError, match="baseline"):
        pg_loss(t([0.0]), t([0.0]), baseline="median")
