"""GPU kernels: a layer's experts as grouped matmuls, and paged decode attention in Triton.

Shape legend: N = (token, expert) rows, E = experts held, H = hidden, I = expert intermediate
size, S = sequences of a decode group, Hq / Hkv = query / kv heads, D = head dim, P = key slots.

Neither reads the device back, so a step's layers run without a host synchronization (and can
be captured in a CUDA graph):

- `experts`: the reference sorts rows by expert and reads each expert's row count back to the
  host (`.tolist()`) to slice; then it launches three matmuls per expert that has rows. Here
  the counts stay on the device as the offsets of one `torch._grouped_mm` per weight (w1, w3,
  w2): three launches per layer whatever the routing. On sm90 / sm100 in bf16 that is CUTLASS's
  grouped GEMM; elsewhere torch falls back to a loop that reads the offsets back.
- `decode_attention`: `triton_attention.paged_decode_attention` reads keys and values where
  they lie in the pool instead of gathering a copy per layer.

Prefill attention, projections and norms are the reference's (cuBLAS and SDPA's flash kernels).
These kernels have been checked against the reference on CPU (Triton's interpreter, torch's CPU
grouped matmul); `tests/test_gpu.py` checks them on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.attention_plan import AttentionGroup
from model.kernels.reference import TorchKernels


class CudaKernels(TorchKernels):
    name = "cuda"

    @staticmethod
    def sync_free(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether no kernel here reads the device back, so a step can be recorded as a CUDA graph:
        bf16 on sm90 / sm100, where `_grouped_mm` is CUTLASS's (elsewhere torch's fallback reads
        the offsets back)."""
        return (
            device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
        )

    def experts(
        self, x: torch.Tensor, local_expert: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        if x.dtype != w1.dtype or x.dtype not in (torch.bfloat16, torch.float32) or not len(x):
            return super().experts(x, local_expert, w1, w3, w2)
        order = torch.argsort(local_expert, stable=True)  # [N] rows grouped by expert
        counts = torch.zeros(w1.shape[0], dtype=torch.int32, device=x.device)  # [E]
        counts.index_add_(0, local_expert, torch.ones_like(local_expert, dtype=torch.int32))
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E] end row of each expert's slice
        xs = x.index_select(0, order)  # [N, H]
        # weights are [E, OUT, IN] (HF's layout): the transposed views are the [E, IN, OUT] operands
        gate = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offsets)  # [N, I]
        up = torch._grouped_mm(xs, w3.transpose(-2, -1), offs=offsets)  # [N, I]
        ys = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)  # [N, H]
        return torch.empty_like(ys).index_copy_(0, order, ys)  # back to the rows' order

    def decode_attention(
        self, q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, group: AttentionGroup, scale: float
    ) -> torch.Tensor:
        if group.key_lens is None or k_store.stride(-1) != 1 or v_store.stride(-1) != 1:
            return super().decode_attention(q, k_store, v_store, group, scale)
        from model.kernels.triton_attention import paged_decode_attention  # Triton only where it runs

        # [S, Hq, D]: k_index lists slots (block_size 1) or block tables (a graph's decode step)
        return paged_decode_attention(q.contiguous(), k_store, v_store, group.k_index, group.key_lens, scale,
                                      group.key_first, group.block_size)  # fmt: skip
