"""Each statistic against a brute-force PyTorch computation, over random shapes, dtypes and special values."""

from __future__ import annotations

import math

import pytest
import torch

from layerwatch import stats


def brute(a: torch.Tensor, eps: float, sat: tuple[float, float] | None) -> dict[str, float | None]:
    x = a.double().flatten()
    finite = x[torch.isfinite(x)]
    n = x.numel()
    return {
        "act_mean": x.mean().item(),
        "act_std": x.std().item() if n > 1 else 0.0,
        "act_max_abs": x.abs().max().item(),
        "zero_frac": (finite.abs() <= eps).sum().item() / n,
        "sat_frac": ((x - sat[0]).abs() > sat[1]).sum().item() / n if sat else None,
        "nonfinite": float((~torch.isfinite(x)).sum().item()),
    }


def computed(a: torch.Tensor, unit_dim: int, eps: float, sat) -> tuple[dict, torch.Tensor, torch.Tensor]:
    out = torch.empty(stats.RAW_WIDTH)
    high, low = stats.activation_raw(a, unit_dim, eps, sat, out=out)
    return stats.finalize_activation(out.tolist(), a.numel(), sat is not None), high, low


@pytest.mark.parametrize("shape", [(7,), (16, 33), (4, 8, 5, 5), (3, 10, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_matches_brute_force(shape, dtype, eps):
    a = torch.randn(shape).relu().to(dtype)  # about half exact zeros
    a.view(-1)[:3] = 0.01  # a few values inside eps
    sat = (0.0, 0.99)
    got, _, _ = computed(a, -1, eps, sat)
    want = brute(a, eps, sat)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=tol, abs=tol), name


def test_exact_values_on_a_known_tensor():
    a = torch.tensor([[0.0, 1.0, -3.0], [2.0, 0.0, 0.0]])
    got, high, low = computed(a, 1, 0.0, None)
    assert got["act_mean"] == 0.0
    assert got["act_std"] == pytest.approx(math.sqrt(14 / 5))
    assert got["act_max_abs"] == 3.0
    assert got["zero_frac"] == 0.5
    assert got["sat_frac"] is None
    assert got["nonfinite"] == 0.0
    assert high.tolist() == [2.0, 1.0, 0.0]
    assert low.tolist() == [0.0, 0.0, -3.0]


def test_nan_and_inf_are_counted_never_filtered():
    a = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0, 2.0])
    got, _, _ = computed(a, 0, 0.0, (0.0, 0.99))
    assert got["nonfinite"] == 3.0
    assert math.isnan(got["act_mean"])
    assert math.isnan(got["act_max_abs"])
    assert got["zero_frac"] == pytest.approx(1 / 6)


def test_saturation_of_sigmoid_band():
    a = torch.tensor([0.001, 0.5, 0.999, 0.2])
    got, _, _ = computed(a, 0, 0.0, (0.5, 0.5 * 0.99))
    assert got["sat_frac"] == 0.5


def test_param_raw_matches_brute_force():
    params = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn(5, 3), torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.0, -4.0, 3.0])]
    raw = stats.param_raw(params, grads).view(stats.PARAM_WIDTH, 2)
    assert raw[stats.P_GRAD_NORM, 0].item() == pytest.approx(grads[0].norm().item(), rel=1e-6)
    assert raw[stats.P_WEIGHT_NORM, 1].item() == pytest.approx(params[1].norm().item(), rel=1e-6)
    assert raw[stats.P_GRAD_MAX, 0].item() == grads[0].max().item()
    assert raw[stats.P_GRAD_MIN, 0].item() == grads[0].min().item()
    assert raw[stats.P_GRAD_FINITE, 0].item() == 15
    assert raw[stats.P_GRAD_FINITE, 1].item() == 5


def test_merge_adds_counts_and_extends_extremes():
    first, second = torch.empty(stats.RAW_WIDTH), torch.empty(stats.RAW_WIDTH)
    a, b = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([5.0, 0.0])
    stats.activation_raw(a, 0, 0.0, None, out=first)
    stats.activation_raw(b, 0, 0.0, None, out=second)
    stats.merge_raw(first, second)
    got = stats.finalize_activation(first.tolist(), 5, False)
    want = brute(torch.cat([a, b]), 0.0, None)
    for name in ("act_mean", "act_std", "act_max_abs", "zero_frac", "nonfinite"):
        assert got[name] == pytest.approx(want[name]), name


def test_an_output_that_feeds_an_activation_gets_its_distribution_only():
    a = torch.randn(6, 5)
    out = torch.empty(stats.RAW_WIDTH)
    high, low = stats.activation_raw(a, 1, 0.0, None, out, positive_only=True, per_unit=False, zeros=False)
    assert high is None and low is None
    got = stats.finalize_activation(out.tolist(), a.numel(), False)
    want = brute(a, 0.0, None)
    for name in ("act_mean", "act_std", "act_max_abs", "nonfinite"):
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    assert got["zero_frac"] is None


@pytest.mark.parametrize("per_unit", [True, False])
def test_uncounted_finite_values_are_proved_by_the_sum_or_left_unknown(per_unit):
    clean = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = torch.empty(stats.RAW_WIDTH)
    stats.activation_raw(clean, 1, 0.0, None, out, per_unit=per_unit, count_finite=False)
    got = stats.finalize_activation(out.tolist(), clean.numel(), False)
    assert got["nonfinite"] == 0.0 and got["zero_frac"] == 0.5  # a finite sum: no NaN/Inf, exactly

    broken = torch.tensor([[0.0, float("nan")], [2.0, float("inf")]])
    stats.activation_raw(broken, 1, 0.0, None, out, per_unit=per_unit, count_finite=False)
    got = stats.finalize_activation(out.tolist(), broken.numel(), False)
    assert math.isnan(got["act_mean"])  # seen, never filtered
    assert got["nonfinite"] is None and got["zero_frac"] is None  # not counted: unknown, not guessed


def test_scratch_gives_the_same_statistics_and_reuses_one_buffer():
    scratch = stats.Scratch()
    first, second = torch.empty(stats.RAW_WIDTH), torch.empty(stats.RAW_WIDTH)
    a = torch.randn(8, 3, 4, 4).relu()
    stats.activation_raw(a, 1, 0.0, (0.0, 0.5), first, scratch=scratch)
    stats.activation_raw(a, 1, 0.0, (0.0, 0.5), second)
    assert torch.equal(first, second)
    small = torch.randn(2, 3)
    assert scratch.like(small).data_ptr() == scratch.like(a).data_ptr()  # one buffer, views of it


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 6, 7), (3, 2, 2, 3, 3)])
def test_per_unit_extremes_of_channel_units(shape):
    a = torch.randn(shape)
    high, low = stats.activation_raw(a, 1, 0.0, None, torch.empty(stats.RAW_WIDTH))
    channels_last = a.transpose(0, 1).reshape(shape[1], -1)
    assert torch.equal(high, channels_last.amax(1)) and torch.equal(low, channels_last.amin(1))
    strided = a.transpose(2, 3) if a.dim() > 3 else a.transpose(0, 2)  # not contiguous: the general path
    unit_dim = 1
    high, _ = stats.activation_raw(strided, unit_dim, 0.0, None, torch.empty(stats.RAW_WIDTH))
    assert torch.equal(high, strided.transpose(0, unit_dim).reshape(strided.shape[unit_dim], -1).amax(1))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000])
def test_unit_masks_pack_sixteen_to_a_float_word_and_back(n):
    mask = torch.rand(n) > 0.5
    mask[-1] = True  # the highest bit of a full word too
    words = stats.pack_bits(mask)
    assert words.dtype == torch.float32 and words.numel() == -(-n // stats.BITS_PER_WORD)
    assert torch.equal(stats.unpack_bits(words, n), mask)
    assert torch.equal(stats.unpack_bits(words.to(torch.int32), n), mask)  # as the ranks OR them


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sum_of_squares_is_the_squared_norm(dtype):
    t = torch.randn(3, 50).to(dtype)
    want = t.double().square().sum().item()
    got = stats.sum_of_squares(t)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5)
