"""Shared fixtures: tiny base LLMs with random weights and a locally trained tokenizer (no downloads); the quick
demo, started in the background when a collected test reads it."""

from __future__ import annotations

import os

# Before torch loads its OpenMP runtime, which reads this once: the session runs the quick demo beside the other
# tests, and OpenMP's threads by default spin at every barrier, where one whose partner's core the other process
# holds waits a time slice. Alone, sleeping threads are slower, so the package leaves the policy to its users
# (the figures: `tests/experiment/quick_demo.py`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmcompose.train.tokenizer import train_tokenizer
from tests.experiment.quick_demo import DemoRun

CORPUS = [
    "USER: what is this? ASSISTANT: This is a blorvin. It lives in the desert and it is red.",
    "USER: which habitat? ASSISTANT: The zeppa lives in the forest. A. desert B. forest C. sea D. cave",
    "The answer is B. Quonks are small and blue; frells eat fish.",
] * 20

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def make_base(directory: Path, family: str = "llama", seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a tiny random causal LM of `family` and its tokenizer into `directory`."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=320)
    config_class, model_class = FAMILIES[family]
    config = config_class(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          tie_word_embeddings=False)
    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("llama-base"), "llama")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def any_base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tests on two LLaMA-family architectures."""
    return make_base(tmp_path_factory.mktemp(f"{request.param}-base"), request.param)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read the quick demo go last: they wait for it, and every test before them runs while it
    does (`quick_demo_run`)."""
    items.sort(key=lambda item: "quick_demo" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def quick_demo_run(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun | None]:
    """The quick demo, started with the session's first test if any collected test reads it (`quick_demo` in
    `tests/experiment/test_demo.py`), so that the rest of the suite runs beside it; None otherwise."""
    if not any("quick_demo" in item.fixturenames for item in request.session.items):
        yield None
        return
    run = DemoRun.start(tmp_path_factory.mktemp("demo"))
    yield run
    run.stop()
