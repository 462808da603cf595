"""Shared fixtures: tiny base LLMs with random weights and a locally trained tokenizer (no downloads); how the
suite shares the CPU when it runs in several processes (`pytest -n 2`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmcompose.train.tokenizer import train_tokenizer

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


def pytest_configure(config: pytest.Config) -> None:
    """A test process under xdist computes on one thread: the e2e demo runs in its own subprocess beside the
    other tests, with the machine's threads, and a tiny model's matmul gains little from a second thread."""
    if hasattr(config, "workerinput"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The e2e tests first, as one xdist group: their shared demo run (~10 min on 2 cores) is the suite's longest
    step, and its first part, the base LLM's pretraining, leaves most of a second core idle for the other tests.
    With `--no-loadscope-reorder` (in pyproject's addopts) xdist schedules groups in this order."""
    e2e = [item for item in items if item.get_closest_marker("e2e")]
    for item in e2e:
        item.add_marker(pytest.mark.xdist_group("e2e"))
    items[:] = e2e + [item for item in items if not item.get_closest_marker("e2e")]


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("llama-base"), "llama")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def any_base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tests on two LLaMA-family architectures."""
    return make_base(tmp_path_factory.mktemp(f"{request.param}-base"), request.param)
