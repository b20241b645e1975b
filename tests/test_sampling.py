"""Sampling rules and seeded reproducibility of the reference generator."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from model import DrawParams, generate, load_model, sample
from model.sampling import make_generator
from tests.support.common import grid_config

pytestmark = pytest.mark.unit

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(params: DrawParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    gen = make_generator(seed)
    return torch.tensor([sample(LOGITS, params, gen) for _ in range(n)])


def test_greedy_and_degenerate_cuts_pick_the_argmax() -> None:
    for params in (
        DrawParams(temperature=0.0),
        DrawParams(temperature=1.0, top_k=1),
        DrawParams(temperature=5.0, top_p=0.01),
        DrawParams(temperature=1.0, top_p=2.2e-309),  # under fp32's range: was a failed draw (a 500)
    ):
        assert set(draws(params, n=200).tolist()) == {0}


def test_frequencies_follow_the_tempered_softmax() -> None:
    for temperature in (1.0, 0.5):
        counts = torch.bincount(draws(DrawParams(temperature=temperature)), minlength=6).float()
        expected = torch.softmax(LOGITS / temperature, 0)
        assert (counts / counts.sum() - expected).abs().max() < 0.03


def test_top_k_and_top_p_cut_the_tail() -> None:
    assert set(draws(DrawParams(top_k=3)).tolist()) == {0, 1, 2}
    probs = torch.softmax(LOGITS, 0)  # 0.61, 0.22, 0.14, ...: top_p 0.7 keeps the first two
    assert probs[0] < 0.7 < probs[0] + probs[1]
    got = draws(DrawParams(top_p=0.7))
    assert set(got.tolist()) == {0, 1}
    share = (got == 0).float().mean()
    assert abs(share - probs[0] / (probs[0] + probs[1])) < 0.03  # renormalised over the kept set


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("seed", 2**64),
     ("seed", -(2**63) - 1)],
)  # fmt: skip
def test_invalid_params_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        DrawParams(**{field: value})


def test_extreme_but_valid_settings_still_draw_a_token() -> None:
    """Clients may send these; before, a draw at temperature 1e-40 divided the logits into inf and
    NaN and the sampler raised, and a seed of 2**64 - 1 or -2**63 did not fit the generator."""
    for params in (DrawParams(temperature=1e-40), DrawParams(temperature=9e-6)):
        assert params.greedy and set(draws(params, n=50).tolist()) == {0}
    for seed in (2**64 - 1, -(2**63)):
        assert 0 <= sample(LOGITS, DrawParams(seed=seed), make_generator(seed)) < len(LOGITS)


def test_the_generator_lives_on_the_logits_device() -> None:
    assert make_generator(3, LOGITS.device).device == LOGITS.device  # CUDA logits: tests/test_gpu.py


def test_seeded_generation_is_reproducible(checkpoint_factory) -> None:
    model = load_model(checkpoint_factory(grid_config(), seed=21))
    prompts = [[1, 50, 60, 70], [1, 300, 12]]
    params = DrawParams(temperature=1.0, top_p=0.9, seed=1234)
    first = generate(model, prompts, params, 24, eos_id=None)
    assert generate(model, prompts, params, 24, eos_id=None) == first
    other = generate(model, prompts, params.model_copy(update={"seed": 99}), 24, eos_id=None)
    assert other != first
    greedy = generate(model, prompts, DrawParams(temperature=0.0), 24, eos_id=None)
    assert greedy != first  # sampling really samples


def test_generation_stops_at_eos(checkpoint_factory) -> None:
    model = load_model(checkpoint_factory(grid_config(), seed=21))
    free = generate(model, [[1, 50, 60, 70]], DrawParams(temperature=0.0), 12, eos_id=None)[0]
    stop_at = free[4]
    first = free.index(stop_at)
    cut = generate(model, [[1, 50, 60, 70]], DrawParams(temperature=0.0), 12, eos_id=stop_at)[0]
    assert cut == free[: first + 1]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], DrawParams())
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, [[1, 50]], DrawParams(), max_tokens=0)


def test_generate_honours_logit_bias_and_banned_ids(checkpoint_factory) -> None:
    model = load_model(checkpoint_factory(grid_config(), seed=21))
    prompt = [1, 50, 60, 70]
    free = generate(model, [prompt], DrawParams(temperature=0.0), 10, eos_id=None)[0]
    assert generate(model, [prompt], DrawParams(temperature=0.0, logit_bias={77: 100.0}), 6, eos_id=None)[0] == [77] * 6
    banned = generate(model, [prompt], DrawParams(temperature=0.0, bad_token_ids=sorted(set(free))), 10, eos_id=None)[0]
    assert not set(banned) & set(free)
    with pytest.raises(ValidationError, match="bad_token_ids"):
        DrawParams(bad_token_ids=[-3])
