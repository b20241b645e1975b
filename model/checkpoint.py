"""Checkpoints: Hugging Face and Mistral safetensors layouts, read tensor by tensor.

Canonical tensor names are the Hugging Face on-disk names. The Mistral consolidated layout maps
onto them through `_MISTRAL_NAMES` (one table, both directions), with the rotary row permutation
of wq / wk. A `Checkpoint` opens only file headers; `read` loads just the requested tensors,
straight to the requested device and dtype, so a worker never holds another worker's weights.
Pickle-based files (`.bin`, `.pt`, `.pth`) are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from model.config import ALL_PARTS, ModelConfig, Part

logger = logging.getLogger(__name__)


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
PROGRESS_BYTES = 1 << 30  # show a progress bar when a read is larger than this

# (Mistral consolidated suffix, Hugging Face suffix) for per-layer tensors; {e} = expert id.
_MISTRAL_NAMES: tuple[tuple[str, str], ...] = (
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("feed_forward.gate.weight", "block_sparse_moe.gate.weight"),
    ("feed_forward.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w1.weight"),
    ("feed_forward.experts.{e}.w2.weight", "block_sparse_moe.experts.{e}.w2.weight"),
    ("feed_forward.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w3.weight"),
)
_MISTRAL_GLOBALS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^(model\.)?layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config."""


# ---- names and shapes (pure) -----------------------------------------------------------------


def weight_names(
    config: ModelConfig,
    layers: Iterable[int] | None = None,
    experts: Collection[int] | None = None,
    parts: Collection[Part] = ALL_PARTS,
) -> list[str]:
    """Canonical names of a selection: `layers` (default all), `experts` ids (default all), `parts`."""
    unknown = set(parts) - ALL_PARTS
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {sorted(ALL_PARTS)}")
    layer_ids = range(config.num_layers) if layers is None else list(layers)
    expert_ids = range(config.num_experts) if experts is None else sorted(experts)
    for e in expert_ids:
        if not 0 <= e < config.num_experts:
            raise ValueError(f"expert id {e} out of range for {config.num_experts} experts")
    names = ["model.embed_tokens.weight"] if "embed" in parts else []
    for i in layer_ids:
        p = f"model.layers.{i}."
        if "attention" in parts:
            names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if "gate" in parts:
            names.append(p + "block_sparse_moe.gate.weight")
        if "experts" in parts:
            names += [p + f"block_sparse_moe.experts.{e}.{w}.weight" for e in expert_ids for w in ("w1", "w2", "w3")]
    if "head" in parts:
        names += ["model.norm.weight", "lm_head.weight"]
    return names


def expected_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape a canonical tensor must have under `config` (nn.Linear weights are [out, in])."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    glob = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "lm_head.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if name in glob:
        return glob[name]
    m = _LAYER.match(name)
    if m is None:
        raise KeyError(f"{name} is not a Mixtral tensor name")
    rest = re.sub(r"experts\.\d+\.", "experts.{e}.", m.group(3))
    per_layer = {
        "self_attn.q_proj.weight": (config.num_heads * d, h),
        "self_attn.k_proj.weight": (config.num_kv_heads * d, h),
        "self_attn.v_proj.weight": (config.num_kv_heads * d, h),
        "self_attn.o_proj.weight": (h, config.num_heads * d),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "block_sparse_moe.gate.weight": (config.num_experts, h),
        "block_sparse_moe.experts.{e}.w1.weight": (i, h),
        "block_sparse_moe.experts.{e}.w3.weight": (i, h),
        "block_sparse_moe.experts.{e}.w2.weight": (h, i),
    }
    if rest not in per_layer:
        raise KeyError(f"{name} is not a Mixtral tensor name")
    return per_layer[rest]


def mistral_to_hf(name: str) -> str:
    """Canonical (HF) name of a Mistral consolidated tensor name."""
    if name in _MISTRAL_GLOBALS:
        return _MISTRAL_GLOBALS[name]
    m = _LAYER.match(name)
    if m and not m.group(1):
        for mistral, hf in _MISTRAL_NAMES:
            sub = _match_expert(mistral, m.group(3))
            if sub is not None:
                return f"model.layers.{m.group(2)}." + hf.replace("{e}", sub)
    raise CheckpointError(f"tensor {name} is not part of the Mistral Mixtral layout")


def hf_to_mistral(name: str) -> str:
    """Mistral consolidated name of a canonical (HF) tensor name."""
    for mistral, hf in _MISTRAL_GLOBALS.items():
        if hf == name:
            return mistral
    m = _LAYER.match(name)
    if m and m.group(1):
        for mistral, hf in _MISTRAL_NAMES:
            sub = _match_expert(hf, m.group(3))
            if sub is not None:
                return f"layers.{m.group(2)}." + mistral.replace("{e}", sub)
    raise CheckpointError(f"tensor {name} is not part of the Hugging Face Mixtral layout")


def _match_expert(pattern: str, text: str) -> str | None:
    """The expert id matched by `{e}` in pattern ('' when the pattern has none), or None."""
    regex = "^" + re.escape(pattern).replace(r"\{e\}", r"(\d+)") + "$"
    m = re.match(regex, text)
    if m is None:
        return None
    return m.group(1) if m.groups() else ""


def permute_rotary_rows(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """wq / wk rows between Mistral's interleaved-pair rotary order and HF's rotate-half order."""
    d_out, d_in = w.shape
    if to_hf:  # [n, D/2, 2, in] -> [n, 2, D/2, in]
        return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)
    return w.view(n_heads, 2, d_out // n_heads // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


# ---- reading -------------------------------------------------------------------------------


class Checkpoint:
    """A checkpoint directory: its config, its layout and where each tensor lives.

    Opening reads file headers only. `read(names)` loads those tensors and nothing else;
    every key actually fetched from disk is appended to `keys_read` (stored names).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} is not a directory")
        self.config = ModelConfig.from_checkpoint(self.path)
        self.layout: Literal["hf", "mistral"]
        self._where: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, stored key)
        self.keys_read: list[str] = []
        mistral_files = sorted(self.path.glob("consolidated*.safetensors"))
        if (self.path / "config.json").is_file():
            self.layout = "hf"
            self._index_hf()
        elif mistral_files:
            self.layout = "mistral"
            for f in mistral_files:
                for key in _header_keys(f):
                    self._add(mistral_to_hf(key), f, key)
        else:
            self._refuse_pickles()
            raise CheckpointError(f"checkpoint {self.path} has params.json but no consolidated*.safetensors files")

    def _index_hf(self) -> None:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from e
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise CheckpointError(f"{index} names {f.name}, which is missing from {self.path}")
                stored = set(_header_keys(f))
                for name, where in files.items():
                    if where == f and name not in stored:
                        raise CheckpointError(f"{index} puts {name} in {f.name}, but that file has no such tensor")
            for name, f in files.items():
                self._add(name, f, name)
            return
        # Some repositories ship the Mistral files beside the HF ones; config.json means HF here.
        shards = sorted(f for f in self.path.glob("*.safetensors") if not f.name.startswith("consolidated"))
        if not shards:
            self._refuse_pickles()
            raise CheckpointError(f"checkpoint {self.path} has config.json but no .safetensors files")
        for f in shards:
            for key in _header_keys(f):
                self._add(key, f, key)

    def _add(self, name: str, file: Path, key: str) -> None:
        if name in self._where:
            raise CheckpointError(f"tensor {name} appears twice: in {self._where[name][0].name} and {file.name}")
        self._where[name] = (file, key)

    def _refuse_pickles(self) -> None:
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"checkpoint {self.path} holds only pickle-based weights ({', '.join(pickles)}); they are never "
                "loaded because unpickling can run arbitrary code. Convert them to .safetensors first."
            )

    @property
    def names(self) -> set[str]:
        """Canonical names of every tensor in the checkpoint."""
        return set(self._where)

    def nbytes(self, names: Iterable[str]) -> int:
        """Bytes on disk of the named tensors (from headers, nothing loaded)."""
        total = 0
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for name in names:
                f, key = self._locate(name)
                if f not in handles:
                    handles[f] = stack.enter_context(_open(f, "cpu"))
                sl = handles[f].get_slice(key)
                total += math.prod(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        return total

    def read(
        self,
        names: Sequence[str],
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (canonical name, tensor) for `names`, each checked against the config's shape.

        Tensors are read straight to `device` and cast to `dtype` (default: as stored). A progress
        bar is shown when `progress` is True, or when None and the read is over 1 GiB.
        """
        total = self.nbytes(names)
        show = progress if progress is not None else total > PROGRESS_BYTES
        logger.info("reading %d tensors (%.1f MB) from %s", len(names), total / 1e6, self.path)
        with ExitStack() as stack:
            bar = stack.enter_context(
                tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {self.path.name}", disable=not show)
            )
            handles: dict[Path, Any] = {}
            for name in names:
                f, key = self._locate(name)
                if f not in handles:
                    handles[f] = stack.enter_context(_open(f, device))
                sl = handles[f].get_slice(key)
                want = expected_shape(self.config, name)
                if tuple(sl.get_shape()) != want:
                    raise CheckpointError(
                        f"tensor {key} in {f} has shape {list(sl.get_shape())}, expected {list(want)} "
                        f"for this config (hidden_size={self.config.hidden_size}, "
                        f"intermediate_size={self.config.intermediate_size}, vocab_size={self.config.vocab_size})"
                    )
                try:
                    tensor = handles[f].get_tensor(key)
                except SafetensorError as e:
                    raise CheckpointError(f"checkpoint file {f} is corrupt reading {key}: {e}") from e
                self.keys_read.append(key)
                if self.layout == "mistral" and name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = self.config.num_heads if "q_proj" in name else self.config.num_kv_heads
                    tensor = permute_rotary_rows(tensor, heads, to_hf=True)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                bar.update(tensor.numel() * _DTYPE_BYTES.get(sl.get_dtype(), 4))
                yield name, tensor

    def _locate(self, name: str) -> tuple[Path, str]:
        if name not in self._where:
            hint = hf_to_mistral(name) if self.layout == "mistral" else name
            raise CheckpointError(f"checkpoint {self.path} has no tensor {hint} (is it a Mixtral checkpoint?)")
        return self._where[name]


def _open(file: Path, device: torch.device | str) -> Any:
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"checkpoint file {file} is truncated or corrupt ({e}); re-download or re-convert it"
        ) from e


def _header_keys(file: Path) -> list[str]:
    with _open(file, "cpu") as f:
        return list(f.keys())
