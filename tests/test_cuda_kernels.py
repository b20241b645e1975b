"""The GPU kernels (`model/kernels/cuda.py`) against the reference, on whatever device is here.

Without CUDA they run on CPU: the grouped expert matmul through torch's CPU `_grouped_mm`, the
Triton decode attention through Triton's interpreter (TRITON_INTERPRET, which tests/conftest.py
sets before anything imports triton). On a GPU the same tests run on CUDA.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model.attention_plan import AttentionGroup
from model.kernels import CudaKernels, TorchKernels, select_kernels
from model.kernels.triton_attention import paged_decode_attention
from model.loader import load_model
from model.moe import ExpertFFN
from model.reference_generation import generate
from model.sampling import DrawParams
from tests.support.common import ENGINE_CONFIG, random_prompts

pytestmark = pytest.mark.unit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _experts(held: int, hidden: int, inter: int, dtype: torch.dtype) -> ExpertFFN:
    g = torch.Generator().manual_seed(held)
    ffn = ExpertFFN(hidden, inter, expert_ids=range(held))
    for p in ffn.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.2).to(DEVICE, dtype)
    return ffn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", ["spread", "one expert", "two of eight", "one row"])
def test_grouped_experts_equal_the_reference(dtype: torch.dtype, routing: str) -> None:
    """Every routing shape: rows on all experts, all on one, experts without rows, a single row."""
    ffn = _experts(8, 64, 96, dtype)
    g = torch.Generator().manual_seed(7)
    rows = 1 if routing == "one row" else 40
    local = {
        "spread": torch.randint(0, 8, (rows,), generator=g),
        "one expert": torch.full((rows,), 5),
        "two of eight": torch.randint(0, 2, (rows,), generator=g) * 6,
        "one row": torch.tensor([3]),
    }[routing].to(DEVICE)
    x = torch.randn(rows, 64, generator=g).to(DEVICE, dtype)
    with torch.inference_mode():
        got = CudaKernels().experts(x, local, ffn.w1, ffn.w3, ffn.w2)
        want = TorchKernels().experts(x, local, ffn.w1, ffn.w3, ffn.w2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _decode_case(seqs: int, hq: int, hkv: int, d: int, lens: list[int], seed: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    slots = 512
    q = torch.randn(seqs, hq, d, generator=g).to(DEVICE)
    k_pool, v_pool = (torch.randn(slots, hkv, d, generator=g).to(DEVICE) for _ in range(2))
    width = max(lens)
    k_index = torch.randint(0, slots, (seqs, width), generator=g).to(DEVICE)  # past key_lens: never read
    key_lens = torch.tensor(lens, device=DEVICE)
    mask = (torch.arange(width, device=DEVICE)[None] < key_lens[:, None])[:, None]  # [S, 1, Tk]
    group = AttentionGroup(torch.arange(seqs, device=DEVICE)[:, None], k_index, mask, key_lens)
    return q, k_pool, v_pool, group


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "lens"),
    [
        (8, 2, 16, [1, 70, 130]),  # GQA 4:1, several key blocks, a sequence at its first key
        (4, 4, 24, [9, 64, 65]),  # no GQA, a head dim that is not a power of two, block edges
        (6, 2, 16, [200]),  # 3 query heads per kv head
    ],
)
def test_paged_decode_attention_equals_the_gathering_reference(hq: int, hkv: int, d: int, lens: list[int]) -> None:
    q, k_pool, v_pool, group = _decode_case(len(lens), hq, hkv, d, lens, seed=hq + d)
    scale = d**-0.5
    got = paged_decode_attention(q, k_pool, v_pool, group.k_index, group.key_lens, scale, block_n=32)
    want = TorchKernels().decode_attention(q, k_pool, v_pool, group, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    through_seam = CudaKernels().decode_attention(q, k_pool, v_pool, group, scale)  # its own key block size
    torch.testing.assert_close(through_seam, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", [TorchKernels(), CudaKernels()], ids=["torch", "cuda"])
def test_decode_attention_through_block_tables_equals_the_slot_lists(kernels: TorchKernels) -> None:
    """The form a CUDA graph feeds: padded block tables, a first key position (a sliding window)
    and a key count per sequence; the same numbers as the planner's slot lists."""
    g = torch.Generator().manual_seed(4)
    block, blocks, width = 4, 64, 12  # width: table entries per sequence, most of them padding
    q = torch.randn(3, 8, 16, generator=g).to(DEVICE)
    k_pool, v_pool = (torch.randn(blocks * block, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    tables = torch.stack([torch.randperm(blocks, generator=g)[:width] for _ in range(3)]).to(DEVICE, torch.int32)
    first, lens = torch.tensor([0, 5, 30], device=DEVICE), torch.tensor([1, 14, 9], device=DEVICE)
    paged = AttentionGroup(torch.arange(3, device=DEVICE)[:, None], tables, None, lens, first, block)
    slots = paged.as_slots()
    for s in range(3):  # key j of sequence s at position first + j, through its table
        pos = int(first[s]) + torch.arange(int(lens[s]))
        want = tables[s].cpu().long()[pos // block] * block + pos % block
        assert torch.equal(slots.k_index[s, : int(lens[s])].cpu(), want)
    got = kernels.decode_attention(q, k_pool, v_pool, paged, 0.25)
    torch.testing.assert_close(got, TorchKernels().decode_attention(q, k_pool, v_pool, slots, 0.25), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_paged_decode_attention_refuses_heads_that_do_not_share_evenly() -> None:
    q, k_pool, v_pool, group = _decode_case(1, 4, 3, 16, [5], seed=1)
    with pytest.raises(ValueError, match="4 query heads do not share 3 kv heads evenly"):
        paged_decode_attention(q, k_pool, v_pool, group.k_index, group.key_lens, 1.0)


def test_a_model_on_the_gpu_kernels_generates_what_the_reference_does(checkpoint_factory: Any) -> None:
    """The whole model through the planner and the paged cache, sliding window included: the
    same greedy tokens, and logits within float32 summation-order noise."""
    path = checkpoint_factory(ENGINE_CONFIG, seed=3)
    prompts = random_prompts(3, seed=5, low=4, high=30)
    greedy = DrawParams(temperature=0.0)
    out = {}
    for kernels in (TorchKernels(), CudaKernels()):
        model = load_model(path, device=DEVICE, kernels=kernels)
        out[kernels.name] = generate(model, prompts, greedy, 6, eos_id=None)
        tokens, positions = torch.tensor(prompts[0], device=DEVICE), torch.arange(len(prompts[0]), device=DEVICE)
        with torch.inference_mode():
            out[kernels.name + " logits"] = model(tokens, positions, [len(prompts[0])])
    assert out["cuda"] == out["torch"]
    torch.testing.assert_close(out["cuda logits"], out["torch logits"], rtol=1e-4, atol=1e-4)


def test_the_gpu_kernels_are_chosen_for_gpus_only() -> None:
    with pytest.raises(ValueError, match="kernels 'cuda' run models on a GPU; this one is on cpu"):
        select_kernels("cuda", "cpu", torch.float32)
    assert type(select_kernels("cuda", "cuda", torch.bfloat16)) is CudaKernels
    assert not CudaKernels.sync_free(torch.device("cpu"), torch.bfloat16)  # CUDA graphs on GPUs only
