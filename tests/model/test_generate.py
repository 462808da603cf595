"""Generation: cached equals uncached, folding changes nothing, batches with left padding behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcompose.model import Example, MultimodalLLM
from tests.model.helpers import random_input, randomize_deltas, tiny_modality

MODALITIES = ["image", "audio", "video", "point"]


def _model(base: Path, strategy: str = "decoupled") -> MultimodalLLM:
    model = MultimodalLLM.from_base(base, [tiny_modality(m, boundary=2) for m in MODALITIES], strategy=strategy,
                                    rank=4, alpha=8.0)
    randomize_deltas(model, seed=1, scale=0.3)
    return model.eval()


def _examples() -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    return [
        Example(prompt="USER: <image>\n<audio>\n<video>\n<point>\nwhat do they share? ASSISTANT:",
                inputs={m: [random_input(m, generator)] for m in MODALITIES}),
        Example(prompt="USER: <point> is it red? ASSISTANT:", inputs={"point": [random_input("point", generator)]}),
        Example(prompt="USER: hello ASSISTANT:"),
    ]


def test_cached_and_uncached_greedy_generation_are_identical(any_base: Path) -> None:
    model = _model(any_base)
    examples = _examples()
    cached = model.generate(examples, max_new_tokens=12, use_cache=True)
    uncached = model.generate(examples, max_new_tokens=12, use_cache=False)
    assert cached == uncached
    assert any(text for text in cached)


def test_batched_left_padded_generation_equals_one_by_one(llama_base: Path) -> None:
    model = _model(llama_base)
    examples = _examples()
    batched = model.generate(examples, max_new_tokens=8)
    alone = [model.generate([example], max_new_tokens=8)[0] for example in examples]
    assert batched == alone


@pytest.mark.parametrize("strategy", ["decoupled", "shared", "full"])
def test_folding_the_text_route_keeps_logits_and_unfolds_exactly(llama_base: Path, strategy: str) -> None:
    model = _model(llama_base, strategy)
    batch = model.assemble(_examples(), padding_side="left")
    weights = {name: p.detach().clone() for name, p in model.llm.named_parameters()}
    with torch.no_grad():
        expected = model(batch).logits
        model.fold_text_route()
        folded = model(batch).logits
        generated = model.generate(_examples(), max_new_tokens=6)
        model.unfold_text_route()
        assert model.generate(_examples(), max_new_tokens=6) == generated
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)
    for name, parameter in model.llm.named_parameters():
        assert torch.equal(parameter, weights[name]), name


def test_sampling_is_reproducible_with_a_generator(llama_base: Path) -> None:
    model = _model(llama_base)
    first = model.generate(_examples(), 6, temperature=1.0, generator=torch.Generator().manual_seed(5))
    second = model.generate(_examples(), 6, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert first == second


def test_streaming_reports_each_generated_token(llama_base: Path) -> None:
    model = _model(llama_base)
    streamed: list[int] = []
    text = model.generate(_examples()[:1], max_new_tokens=5, on_token=lambda row, token: streamed.append(token))
    eos = model.tokenizer.eos_token_id
    assert model.tokenizer.decode([t for t in streamed if t != eos], skip_special_tokens=True) == text[0]
