"""Checkpoint layouts, subset reads and the errors a bad checkpoint gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model.checkpoint as ckpt_module
from model import Checkpoint, CheckpointError, load_model, weight_names, write_mistral_checkpoint
from model.checkpoint import hf_to_mistral, mistral_to_hf
from tests.support.common import grid_config

pytestmark = pytest.mark.unit

TOKENS = torch.tensor([5, 17, 300, 2, 99, 41, 7])


def logits(path: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    m = load_model(path, dtype=dtype)
    with torch.no_grad():
        return m(TOKENS, torch.arange(len(TOKENS)), [len(TOKENS)])


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_and_single_file_checkpoints_load_the_same(checkpoint_factory) -> None:
    cfg = grid_config()
    single = checkpoint_factory(cfg, seed=3)
    sharded = checkpoint_factory(cfg, seed=3, max_shard_bytes=300_000)
    assert (single / "model.safetensors").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 3
    assert (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(single), logits(sharded))


def test_mistral_layout_gives_the_same_logits(checkpoint_factory, tmp_path) -> None:
    hf_dir = checkpoint_factory(grid_config(num_kv_heads=1), seed=4)
    mistral_dir = write_mistral_checkpoint(Checkpoint(hf_dir), tmp_path / "mistral")
    stored = load_file(mistral_dir / "consolidated.safetensors")
    assert "layers.0.attention.wq.weight" in stored and "tok_embeddings.weight" in stored
    assert not any(k.startswith("model.") for k in stored)
    ref = load_file(hf_dir / "model.safetensors")
    # The stored q rows really are in Mistral's interleaved order, not a copy of HF's.
    assert not torch.equal(stored["layers.0.attention.wq.weight"], ref["model.layers.0.self_attn.q_proj.weight"])
    assert Checkpoint(mistral_dir).layout == "mistral"
    assert (logits(mistral_dir) - logits(hf_dir)).abs().max().item() < 1e-6


def test_name_table_round_trips(checkpoint_factory) -> None:
    cfg = grid_config()
    for name in weight_names(cfg):
        assert mistral_to_hf(hf_to_mistral(name)) == name
    assert hf_to_mistral("model.layers.3.block_sparse_moe.experts.7.w2.weight") == (
        "layers.3.feed_forward.experts.7.w2.weight"
    )


def test_dtype_on_load(checkpoint_factory) -> None:
    path = checkpoint_factory(grid_config(), seed=3)
    for dtype in (torch.bfloat16, torch.float16):
        m = load_model(path, dtype=dtype)
        assert {p.dtype for p in m.parameters()} == {dtype}
        assert torch.isfinite(logits(path, dtype)).all()


class SpyOpen:
    """Wraps safetensors.safe_open to record every tensor actually fetched."""

    def __init__(self) -> None:
        self.fetched: list[str] = []
        self.real = ckpt_module.safe_open

    def __call__(self, *args, **kwargs):
        handle = self.real(*args, **kwargs)
        spy = self

        class Handle:
            def __enter__(self):
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_slice(self, key):
                return self.inner.get_slice(key)

            def get_tensor(self, key):
                spy.fetched.append(key)
                return self.inner.get_tensor(key)

        return Handle()


@pytest.mark.parametrize("max_shard_bytes", [2 << 30, 300_000])
def test_expert_subset_reads_only_those_tensors(checkpoint_factory, monkeypatch, max_shard_bytes: int) -> None:
    cfg = grid_config()
    ck = Checkpoint(checkpoint_factory(cfg, seed=3, max_shard_bytes=max_shard_bytes))
    spy = SpyOpen()
    monkeypatch.setattr(ckpt_module, "safe_open", spy)
    wanted = weight_names(cfg, layers=[1, 2], experts=[1, 6], parts=["experts"])
    tensors = dict(ck.read(wanted))
    assert sorted(spy.fetched) == sorted(wanted)
    assert len(wanted) == 2 * 2 * 3
    assert all(".experts.1." in k or ".experts.6." in k for k in spy.fetched)
    assert tensors["model.layers.2.block_sparse_moe.experts.6.w2.weight"].shape == (cfg.hidden_size, 128)
    spy.fetched.clear()
    gates = dict(ck.read(weight_names(cfg, parts=["gate"])))
    assert sorted(spy.fetched) == sorted(gates) == [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(4)]


def test_progress_bar_on_request(checkpoint_factory, capsys) -> None:
    load_model(checkpoint_factory(grid_config(), seed=3), progress=True)
    assert "loading" in capsys.readouterr().err


# ---- bad checkpoints -------------------------------------------------------------------------


def test_missing_tensor(checkpoint_factory, tmp_path) -> None:
    path = copy(checkpoint_factory(grid_config(), seed=3), tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.3.block_sparse_moe.gate.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"has no tensor model\.layers\.3\.block_sparse_moe\.gate\.weight"):
        load_model(path)


def test_extra_tensor_nobody_loads(checkpoint_factory, tmp_path) -> None:
    path = copy(checkpoint_factory(grid_config(), seed=3), tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensors that no part of the model loads.*layers\.9"):
        load_model(path)


def test_wrong_shape(checkpoint_factory, tmp_path) -> None:
    path = copy(checkpoint_factory(grid_config(), seed=3), tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight .* has shape \[128, 64\], expected \[96, 64\]"):
        load_model(path)


def test_truncated_file(checkpoint_factory, tmp_path) -> None:
    path = copy(checkpoint_factory(grid_config(), seed=3), tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_model(path)


def test_corrupt_header(checkpoint_factory, tmp_path) -> None:
    path = copy(checkpoint_factory(grid_config(), seed=3), tmp_path / "c")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:40] = b"\x00" * 32  # garbage where the JSON header starts
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_pickle_checkpoints_are_refused_unopened(checkpoint_factory, tmp_path, monkeypatch) -> None:
    path = tmp_path / "c"
    path.mkdir()
    shutil.copy(checkpoint_factory(grid_config(), seed=3) / "config.json", path)
    torch.save({"x": torch.zeros(1)}, path / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    with pytest.raises(CheckpointError, match=r"only pickle-based weights \(pytorch_model\.bin\).*never loaded"):
        load_model(path)
    mistral = tmp_path / "m"
    mistral.mkdir()
    (mistral / "params.json").write_text(json.dumps(grid_config().to_mistral_dict()))
    torch.save({"x": torch.zeros(1)}, mistral / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth"):
        load_model(mistral)


def test_index_naming_a_missing_shard(checkpoint_factory, tmp_path) -> None:
    path = copy(checkpoint_factory(grid_config(), seed=3, max_shard_bytes=300_000), tmp_path / "c")
    victim = sorted(path.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names {victim.name}, which is missing"):
        Checkpoint(path)


def test_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="is not a directory"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"neither config\.json"):
        Checkpoint(tmp_path)


def test_transformers_loads_the_sharded_checkpoint(checkpoint_factory) -> None:
    from transformers import MixtralForCausalLM

    path = checkpoint_factory(grid_config(), seed=3, max_shard_bytes=300_000)
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(TOKENS[None]).logits[0]
    assert (logits(path) - ref).abs().max().item() < 1e-4
