"""Projections on the CPU kernels: the compiled loop (few rows) and oneDNN (more rows) give
F.linear's results (up to summation order), `Linear` keeps nn.Linear's parameters, and the
kernels step aside (to F.linear) where they do not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.kernels import CpuKernels
from model.kernels.cpu import KERNEL_ROWS, ROW_TILE, padded_rows
from model.linear import Linear

pytestmark = pytest.mark.unit

CPU = CpuKernels.for_this_machine()
ONEDNN_ONLY = CpuKernels(None)  # as where the C++ loops cannot be built


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return CPU.linear(x, (w,))


# 1, 4, (2, 2): our kernel; 7, 17, (3, 5): oneDNN; 300: two oneDNN tiles
@pytest.mark.parametrize("shape", [(1, 64), (4, 64), (2, 2, 64), (7, 64), (17, 64), (3, 5, 64), (300, 64), (0, 64)])
def test_linear_equals_f_linear(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g), torch.randn(96, 64, generator=g)
    with torch.inference_mode():
        y = linear(x, w)
    assert y.shape == (*shape[:-1], 96)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_weight_views() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g).T  # [10, 64], not contiguous
    stacked = torch.randn(4, 32, 64, generator=g)  # like ExpertFFN's [E, I, H]
    with torch.inference_mode():
        y = linear(x, stacked[2])
    torch.testing.assert_close(y, x @ stacked[2].T, rtol=1e-5, atol=1e-5)


def test_cpu_fp32_inference_takes_the_compiled_loop_at_few_rows_and_onednn_beyond() -> None:
    w = (torch.randn(4, 8),)
    with torch.inference_mode():
        assert CPU.path_for(torch.randn(KERNEL_ROWS, 8), w) == "compiled"
        assert CPU.path_for(torch.randn(KERNEL_ROWS + 1, 8), w) == "onednn"
        assert CPU.path_for(torch.randn(2, 8).bfloat16(), (w[0].bfloat16(),)) == "torch"  # other dtypes: F.linear
        assert CPU.path_for(torch.randn(2, 9), w) == "torch"  # and F.linear's error for a wrong width
        assert ONEDNN_ONLY.path_for(torch.randn(1, 8), w) == "onednn"


def test_q_k_and_v_in_one_call_equal_three_projections() -> None:
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(n, 64, generator=g) for n in (96, 32, 32)]
    for rows in (1, 3, 40):
        x = torch.randn(rows, 64, generator=g)
        with torch.inference_mode():
            y = CPU.linear(x, ws)
        torch.testing.assert_close(y, torch.cat([F.linear(x, w) for w in ws], dim=-1), rtol=1e-5, atol=1e-5)


def test_gradients_still_flow() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    linear(x, w).square().sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    F.linear(x, w).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_bf16_is_f_linear_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 32, generator=g).bfloat16(), torch.randn(16, 32, generator=g).bfloat16()
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_a_wrong_input_width_fails_like_f_linear() -> None:
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), torch.inference_mode():
        linear(torch.randn(3, 10), torch.randn(4, 8))


def test_module_keeps_nn_linear_parameters() -> None:
    m = Linear(8, 4, CPU)
    assert list(m.state_dict()) == ["weight"] and m.weight.shape == (4, 8)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), x @ m.weight.T, rtol=1e-5, atol=1e-5)


def test_row_counts_map_to_a_small_fixed_set_of_shapes() -> None:
    padded = {n: padded_rows(n) for n in range(1, ROW_TILE + 1)}
    assert all(n <= p <= 1.25 * n for n, p in padded.items())
    assert len(set(padded.values())) == 32  # kernels oneDNN builds per weight shape, whatever the traffic
    assert max(padded.values()) == ROW_TILE
