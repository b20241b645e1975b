"""The kernel seam and the C++ decode kernels (projections, experts, attention): they build on
this machine, equal the reference (torch) kernels up to summation order, refuse malformed input
with a message, and are chosen once per model from the config's `kernels` field."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from model.kernels import CpuKernels, TorchKernels, compiled, select_kernels
from model.kernels.cpu import KERNEL_ROWS_PER_EXPERT
from model.loader import load_model
from model.moe import ExpertFFN
from tests.support.common import GRID_BASE

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def kernels() -> Any:
    module = compiled.build()
    assert module is not None, "the C++ kernels did not build here (see the warning logged by model.kernels)"
    return module


def _experts(seed: int, held: int = 4, hidden: int = 48, inter: int = 80, kernels: Any = None) -> ExpertFFN:
    g = torch.Generator().manual_seed(seed)
    ffn = ExpertFFN(hidden, inter, expert_ids=range(10, 10 + held), kernels=kernels)
    for p in ffn.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    return ffn


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_expert_ffn_equals_the_torch_path(rows: int, kernels: Any) -> None:
    ffn = _experts(rows)
    g = torch.Generator().manual_seed(100 + rows)
    x = torch.randn(rows, 48, generator=g)
    local = torch.randint(0, 2, (rows,), generator=g) * 3  # experts 0 and 3 only: 1 and 2 get no rows
    with torch.inference_mode():
        got = kernels.expert_ffn(x, local, ffn.w1, ffn.w3, ffn.w2)
        want = TorchKernels().experts(x, local, ffn.w1, ffn.w3, ffn.w2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_expert_ffn_module_runs_each_expert_on_the_kernel_for_its_rows(kernels: Any) -> None:
    """The compiled loop takes the rows of the experts with few (faster there), oneDNN the others."""
    calls: list[int] = []

    class Spy:
        rows_linear = kernels.rows_linear

        @staticmethod
        def expert_ffn(x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return kernels.expert_ffn(x, *args)

    ffn = _experts(7, kernels=CpuKernels(Spy))
    many = KERNEL_ROWS_PER_EXPERT + 1
    local = torch.tensor([0] * many + [2, 3, 2])  # expert 0: too many rows for the loop; 2 and 3: few
    x = torch.randn(len(local), 48, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        mixed = ffn(x, local)
        ffn(x[many:], local[many:])  # only experts with few rows
        ffn(x[:many], local[:many])  # only one with many
        want = TorchKernels().experts(x, local, ffn.w1, ffn.w3, ffn.w2)
    assert calls == [3, 3]  # experts 2 and 3's rows, twice; expert 0's never
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)


def test_rows_linear_concatenates_its_weights(kernels: Any) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=g)
    ws = [torch.randn(n, 40, generator=g) for n in (70, 1, 33)]  # widths that split parallel chunks unevenly
    torch.testing.assert_close(
        kernels.rows_linear(x, ws), torch.cat([F.linear(x, w) for w in ws], -1), rtol=1e-5, atol=1e-5
    )


def test_decode_attention_equals_sdpa_over_gathered_keys(kernels: Any) -> None:
    g = torch.Generator().manual_seed(6)
    s, hq, hkv, d, pool = 3, 8, 2, 16, 40
    q = torch.randn(s, hq, d, generator=g)
    k_pool, v_pool = torch.randn(pool, hkv, d, generator=g), torch.randn(pool, hkv, d, generator=g)
    lens = [7, 1, 12]
    k_index = torch.stack([torch.randperm(pool, generator=g)[:12] for _ in range(s)])  # [S, 12], tails are padding
    got = kernels.decode_attention(q, k_pool, v_pool, k_index, torch.tensor(lens), 0.25)
    for i, n in enumerate(lens):
        keys = k_pool[k_index[i, :n]].transpose(0, 1)  # [Hkv, n, D]
        values = v_pool[k_index[i, :n]].transpose(0, 1)
        want = F.scaled_dot_product_attention(q[i][:, None], keys, values, scale=0.25, enable_gqa=True)  # [Hq, 1, D]
        torch.testing.assert_close(got[i], want[:, 0], rtol=1e-5, atol=1e-5)


def test_malformed_input_is_refused_with_a_message(kernels: Any) -> None:
    ffn = _experts(8)
    x = torch.randn(2, 48)
    with pytest.raises(RuntimeError, match="routed to expert 4 of 4"):
        kernels.expert_ffn(x, torch.tensor([0, 4]), ffn.w1, ffn.w3, ffn.w2)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.expert_ffn(x, torch.tensor([0, 1], dtype=torch.int32), ffn.w1, ffn.w3, ffn.w2)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.rows_linear(x.double(), [torch.randn(4, 48)])
    with pytest.raises(RuntimeError, match="takes 47"):
        kernels.rows_linear(x, [torch.randn(4, 47)])
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.rows_linear(x, [torch.randn(48, 4).T])
    q, pool = torch.randn(1, 4, 8), torch.randn(10, 2, 8)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.decode_attention(q, pool, pool, torch.tensor([[3, 10]]), torch.tensor([2]), 1.0)
    with pytest.raises(RuntimeError, match="has 3 keys of 2"):
        kernels.decode_attention(q, pool, pool, torch.tensor([[3, 4]]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="dividing the 4 query heads"):
        kernels.decode_attention(
            q, torch.randn(10, 3, 8), torch.randn(10, 3, 8), torch.tensor([[1]]), torch.tensor([1]), 1.0
        )


def test_kernels_are_chosen_once_for_the_models_device_and_dtype(checkpoint_factory: Any) -> None:
    assert type(select_kernels("auto", "cpu", torch.float32)) is CpuKernels
    assert type(select_kernels("auto", "cpu", torch.bfloat16)) is TorchKernels
    assert type(select_kernels("auto", "cuda", torch.float32)) is TorchKernels
    assert type(select_kernels("torch", "cpu", torch.float32)) is TorchKernels
    with pytest.raises(ValueError, match=r"kernels .cpu. run float32 models on the CPU; this one is torch\.bfloat16"):
        select_kernels("cpu", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="kernels must be one of auto, torch, cpu"):
        select_kernels("triton", "cpu", torch.float32)  # type: ignore[arg-type]

    path = checkpoint_factory(GRID_BASE)
    tokens, positions = torch.tensor([1, 5, 9, 2, 7]), torch.tensor([0, 1, 2, 0, 1])
    logits = {}
    for choice in ("torch", "cpu"):
        model = load_model(path, kernels=choice)
        held = {id(m.kernels) for m in model.modules() if hasattr(m, "kernels")}
        assert held == {id(model.kernels)} and model.kernels.name == choice  # one object, shared by every layer
        with torch.inference_mode():
            logits[choice] = model(tokens, positions, [3, 2])
    torch.testing.assert_close(logits["cpu"], logits["torch"], rtol=1e-4, atol=1e-4)
