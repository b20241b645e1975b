"""lm-evaluation-harness, as its users run it, against the Serve app: model `local-completions`
with the server's own tokenizer (`/tokenize`, `/detokenize`, `/tokenizer_info`: nothing comes from
a hub), on two small tasks whose data this test writes: a loglikelihood (multiple choice) task and
a `generate_until` task. Its loglikelihoods must equal transformers' on the same checkpoint and
tokens, and its generations transformers' greedy continuations."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import MixtralForCausalLM

from model import ModelConfig, Tokenizer
from tests.serve_helpers import MODEL, serving

pytestmark = pytest.mark.serve

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")  # in the test extra; skipped only in a bare install

LL_DOCS = [
    {"context": "The capital of France is", "choices": [" Paris", " Berlin", " a city by the sea"], "answer": 0},
    {"context": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"context": "Water is made of hydrogen and", "choices": [" oxygen", " gold", " light"], "answer": 0},
]
GEN_DOCS = [
    {"question": "Q: What is the colour of the sky?\nA:", "answer": " blue"},
    {"question": "Q: Name a fruit.\nA:", "answer": " apple"},
]
MAX_GEN = 8


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Path:
    return checkpoint_factory(ModelConfig.preset("tiny"), seed=5)


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[dict[str, Any]]:
    with serving(ckpt, {"max_model_len": 1024}) as s:
        yield s


def write_tasks(folder: Path) -> None:
    (folder / "ll.json").write_text("\n".join(json.dumps(d) for d in LL_DOCS))
    (folder / "gen.json").write_text("\n".join(json.dumps(d) for d in GEN_DOCS))
    ll = {
        "task": "mixtral_tiny_choice", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "ll.json")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}],
    }  # fmt: skip
    gen = {
        "task": "mixtral_tiny_generate", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "gen.json")}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False, "temperature": 0},
        "metric_list": [{"metric": "exact_match"}],
    }  # fmt: skip
    (folder / "ll.yaml").write_text(yaml.safe_dump(ll))
    (folder / "gen.yaml").write_text(yaml.safe_dump(gen))


def test_lm_eval_local_completions_equals_transformers(server: dict[str, Any], ckpt: Path, tmp_path: Path) -> None:
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    lm = LocalCompletionsAPI(base_url=server["url"] + "/v1/completions", model=MODEL, tokenizer_backend="remote",
                             tokenized_requests=True, max_length=1024, num_concurrent=2)  # fmt: skip
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["mixtral_tiny_choice", "mixtral_tiny_generate"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True, random_seed=0,
    )  # fmt: skip
    assert results is not None
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    # Loglikelihoods: each (context, choice) pair lm-eval scored, against transformers on its tokens.
    scored = results["samples"]["mixtral_tiny_choice"]
    assert len(scored) == len(LL_DOCS)
    pairs = 0
    for sample in scored:
        for (context, continuation), (ll, _greedy) in zip(
            (a["arguments"] for a in _requests(sample)), (r[0] for r in sample["resps"]), strict=True
        ):
            ctx, cont = lm._encode_pair(context, continuation)
            tokens = torch.tensor([ctx + cont])
            with torch.no_grad():
                logprobs = torch.log_softmax(hf(tokens).logits[0], -1)
            want = sum(logprobs[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
            assert ll == pytest.approx(want, abs=1e-3), (context, continuation)
            pairs += 1
    assert pairs == sum(len(d["choices"]) for d in LL_DOCS)
    assert "acc,none" in results["results"]["mixtral_tiny_choice"]

    # Generations: transformers' greedy continuation of the same tokens, cut at the stop sequence.
    tok = Tokenizer.default()
    generated = results["samples"]["mixtral_tiny_generate"]
    assert len(generated) == len(GEN_DOCS)
    for sample in generated:
        context = _requests(sample)[0]["arguments"][0]
        ids = lm.tok_encode(context)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=0)[0, len(ids) :]
        want = tok.continuation(ids, out.tolist()).split("\n")[0]
        assert sample["resps"][0][0] == want
    assert "exact_match,none" in results["results"]["mixtral_tiny_generate"]


def _requests(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """A logged sample's requests with their arguments (lm-eval logs them under "arguments")."""
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        return [{"arguments": [v for _, v in sorted(a.items())]} for _, a in sorted(args.items())]
    return [{"arguments": a} for a in args]
