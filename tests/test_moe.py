"""The routing function and grouped experts against small pure-torch references."""

import pytest
import torch
import torch.nn.functional as F

from model.moe import ExpertFFN, SparseMoE, route
from tests.support.common import grid_config

pytestmark = pytest.mark.unit


def reference_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mistral's formulation: top-k of the raw logits, softmax over those k."""
    top, idx = torch.topk(logits.float(), k, dim=-1)
    return torch.softmax(top, dim=-1), idx


def reference_moe(x: torch.Tensor, moe: SparseMoE) -> torch.Tensor:
    """Per token, per chosen expert: 15 lines of the textbook definition."""
    logits = x @ moe.gate.weight.T
    weights, experts = reference_route(logits, moe.top_k)
    out = torch.zeros_like(x)
    ex = moe.experts
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            e = int(experts[t, j])
            h = F.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])
            out[t] += weights[t, j] * (ex.w2[e] @ h)
    return out


@pytest.mark.parametrize(("experts", "k"), [(1, 1), (4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 8)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_route_equals_topk_then_softmax(experts: int, k: int, tokens: int) -> None:
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens * 10 + k))
    w, idx = route(logits, k)
    rw, ridx = reference_route(logits, k)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw)
    torch.testing.assert_close(w.sum(-1), torch.ones(tokens))


def test_route_is_fp32_then_cast_back() -> None:
    logits = torch.randn(5, 8).to(torch.bfloat16)
    w, _ = route(logits, 2)
    assert w.dtype == torch.bfloat16
    w32, _ = route(logits.float(), 2)
    torch.testing.assert_close(w.float(), w32, atol=1e-2, rtol=0)


@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("tokens", [1, 3, 50])
def test_sparse_moe_equals_reference(num_experts: int, k: int, tokens: int) -> None:
    cfg = grid_config(num_experts=num_experts, experts_per_token=k)
    torch.manual_seed(num_experts + k + tokens)
    moe = SparseMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(tokens, cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference_moe(x, moe), atol=1e-5, rtol=1e-5)


def test_expert_ffn_subset_uses_local_slots() -> None:
    """A group holding experts [5, 2] answers local slot 0 with expert 5's weights."""
    torch.manual_seed(0)
    full = ExpertFFN(16, 32, range(8))
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.3)
    part = ExpertFFN(16, 32, [5, 2])
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(part, name).copy_(getattr(full, name)[[5, 2]])
        x = torch.randn(9, 16)
        local = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1])
        torch.testing.assert_close(part(x, local), full(x, torch.tensor([5, 2])[local]))


def test_moe_with_its_experts_as_a_call_equals_the_local_block() -> None:
    """The router's path: the gate here, the experts reached through a call (two groups' subsets)."""
    cfg = grid_config(num_experts=8, experts_per_token=2)
    torch.manual_seed(3)
    moe = SparseMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert moe.experts is not None
    groups = [ExpertFFN(cfg.hidden_size, cfg.intermediate_size, ids) for ids in ([0, 1, 2, 3, 4], [5, 6, 7])]
    for g in groups:
        for name in ("w1", "w2", "w3"):
            getattr(g, name).data = getattr(moe.experts, name).data[g.expert_ids].clone()
    calls: list[int] = []

    def remote(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # [T, H], [T, K] -> [T*K, H]
        calls.append(len(x))
        rows, flat = x.repeat_interleave(2, dim=0), ids.flatten()
        out = torch.empty_like(rows)
        for g in groups:
            mine = torch.isin(flat, torch.tensor(g.expert_ids))
            local = torch.tensor([g.expert_ids.index(int(e)) for e in flat[mine]], dtype=torch.long)
            out[mine] = g(rows[mine], local)
        return out

    x = torch.randn(11, cfg.hidden_size)
    counts = torch.zeros(8, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(moe(x, counts, remote), moe(x), atol=1e-6, rtol=1e-6)
    assert calls == [11] and int(counts.sum()) == 22
