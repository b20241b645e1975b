"""Rotary position embeddings in the Hugging Face (rotate-half) convention.

Shape legend: T = tokens, N = heads, D = head dim.
Mistral's own checkpoints store wq/wk rows in interleaved-pair order; `checkpoint.py` permutes
them on load so that this one convention serves both layouts.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """[D/2] fp32 inverse frequencies theta^(-2i/D)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, D] for integer positions [T], computed in fp32 then cast to `dtype`."""
    freqs = positions.float()[:, None] * inv_frequencies(head_dim, theta, positions.device)[None, :]  # [T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, N, D] rotated by per-token tables cos/sin [T, D]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
