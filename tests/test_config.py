import json

import pytest
from pydantic import ValidationError

from model import ModelConfig, preset_names
from model.config import ModelConfig as Cfg

pytestmark = pytest.mark.unit


def test_presets_by_exact_name() -> None:
    assert {"tiny", "mini", "mixtral-8x7b", "mixtral-8x22b"} <= set(preset_names())
    with pytest.raises(ValueError, match=r"unknown model preset 'Tiny'.*tiny"):
        ModelConfig.preset("Tiny")


def test_official_presets_match_published_configs() -> None:
    small, big = ModelConfig.preset("mixtral-8x7b"), ModelConfig.preset("mixtral-8x22b")
    assert (small.hidden_size, small.num_layers, small.num_heads, small.num_kv_heads) == (4096, 32, 32, 8)
    assert (small.intermediate_size, small.vocab_size, small.rope_theta) == (14336, 32000, 1e6)
    assert (big.hidden_size, big.num_layers, big.num_heads, big.intermediate_size) == (6144, 56, 48, 16384)
    assert big.max_position_embeddings == 65536 and big.sliding_window is None
    # Published parameter counts: 46.7B and 141B.
    assert round(small.num_parameters / 1e9, 1) == 46.7
    assert round(big.num_parameters / 1e9) == 141
    mini = ModelConfig.preset("mini")
    assert 135e6 < mini.num_parameters < 145e6


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"num_heads": 6, "num_kv_heads": 4}, "num_kv_heads"),
        ({"experts_per_token": 9}, "experts_per_token"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"head_dim": 15}, "head_dim"),
        ({"rope_thetaa": 1.0}, "rope_thetaa"),
    ],
)
def test_validation_names_the_field(update: dict[str, object], field: str) -> None:
    base = ModelConfig.preset("tiny").model_dump()
    with pytest.raises(ValidationError, match=field):
        ModelConfig.model_validate(base | update)


def test_frozen() -> None:
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValidationError):
        cfg.hidden_size = 3  # type: ignore[misc]


def test_from_hf_config_with_rope_theta_or_rope_parameters(tmp_path) -> None:
    cfg = ModelConfig.preset("mixtral-8x7b")
    hf = cfg.to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert Cfg.from_checkpoint(tmp_path) == cfg
    newer = {k: v for k, v in hf.items() if k != "rope_theta"} | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}
    }
    (tmp_path / "config.json").write_text(json.dumps(newer))
    assert Cfg.from_checkpoint(tmp_path) == cfg
    scaled = newer | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}
    (tmp_path / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        Cfg.from_checkpoint(tmp_path)


def test_from_mistral_params(tmp_path) -> None:
    # params.json as shipped with Mixtral-8x22B-Instruct-v0.1 (Mistral layout).
    params = {
        "dim": 6144, "n_layers": 56, "head_dim": 128, "hidden_dim": 16384, "n_heads": 48, "n_kv_heads": 8,
        "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0,
        "moe": {"num_experts": 8, "num_experts_per_tok": 2},
    }  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    cfg = Cfg.from_checkpoint(tmp_path)
    assert cfg.model_dump(exclude={"max_position_embeddings"}) == ModelConfig.preset("mixtral-8x22b").model_dump(
        exclude={"max_position_embeddings"}
    )
    (tmp_path / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "moe"}))
    with pytest.raises(ValueError, match="dense model"):
        Cfg.from_checkpoint(tmp_path)


def test_missing_config_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neither config\.json .* nor params\.json"):
        Cfg.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config\.json has no 'num_attention_heads'"):
        Cfg.from_checkpoint(tmp_path)
