"""Template `chat`: the base tokenizer's own Jinja chat template, and the labels it leads to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.compose.config import parse_config
from mmcompose.compose.engine import compose
from mmcompose.data.dataset import SampleDataset
from mmcompose.data.samples import Sample
from mmcompose.errors import CompositionError, MMComposeError
from mmcompose.model import ModelSpec, MultimodalLLM
from mmcompose.model.assembly import IGNORE_INDEX, Example
from mmcompose.model.conversation import format_conversation
from mmcompose.train.run import default_template
from tests.conftest import make_base
from tests.model.helpers import random_input, tiny_modality

# Two small templates in the two styles bases ship: ChatML (Qwen2) closes turns with its own token and has no
# BOS; the [INST] style (Mistral, Llama 2) opens with BOS and closes the assistant's turn with EOS.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
TURNS = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A blorvin."}]


def chat_base(directory: Path, template: str | None, family: str = "qwen2") -> Path:
    """A tiny base whose tokenizer has ChatML's turn tokens and, unless None, `template` as its chat template."""
    make_base(directory, family)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory: pytest.TempPathFactory) -> MultimodalLLM:
    base = chat_base(tmp_path_factory.mktemp("chatml-base"), CHATML)
    return MultimodalLLM.from_base(base, [tiny_modality("image")], template="chat")


def test_chatml_prompt_and_target(chatml_model: MultimodalLLM) -> None:
    assert chatml_model.spec.chat_template == CHATML
    prompt, target = chatml_model.format_conversation(TURNS)
    assert prompt == "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    assert target == "A blorvin.<|im_end|>\n"
    history = [*TURNS, {"from": "human", "value": "Where?"}]
    assert chatml_model.format_conversation(history) == (
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\nA blorvin.<|im_end|>\n"
        "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n", None)


def test_labels_cover_the_answer_and_the_end_of_turn(chatml_model: MultimodalLLM) -> None:
    tokenizer = chatml_model.tokenizer
    example = chatml_model.conversation_example(TURNS)
    example = Example(example.prompt, {"image": [random_input("image", torch.Generator().manual_seed(0))]},
                      example.target)
    batch = chatml_model.assemble([example])
    labels = [token for token in batch.labels[0].tolist() if token != IGNORE_INDEX]
    answer = tokenizer("A blorvin.", add_special_tokens=False)["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert labels == [*answer, tokenizer.convert_tokens_to_ids("<|im_end|>"), *newline, tokenizer.eos_token_id]
    # the labelled tokens are the last ones: everything before the answer is masked
    assert batch.labels[0, -len(labels):].tolist() == labels
    assert (batch.labels[0, :-len(labels)] == IGNORE_INDEX).all()


def test_inst_template_drops_the_doubled_bos_and_eos(chatml_model: MultimodalLLM) -> None:
    tokenizer = chatml_model.tokenizer
    prompt, target = format_conversation(TURNS, "chat", tokenizer, INST)
    assert (prompt, target) == ("[INST] <image>\nWhat is this? [/INST]", "A blorvin.")
    spec = chatml_model.spec.model_copy(update={"chat_template": INST})
    model = MultimodalLLM(chatml_model.llm, tokenizer, spec, chatml_model.base_path, chatml_model.base_fingerprint)
    batch = model.assemble([Example(prompt="[INST] hi [/INST]", target=target)])
    labels = [token for token in batch.labels[0].tolist() if token != IGNORE_INDEX]
    assert labels == [*tokenizer("A blorvin.", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert batch.labels[0].tolist().count(tokenizer.eos_token_id) == 1


def test_training_items_use_the_template(chatml_model: MultimodalLLM, tmp_path: Path) -> None:
    sample = Sample(id="s", conversations=[{"from": "human", "value": "What is this?"},
                                           {"from": "gpt", "value": "A blorvin."}])
    item = SampleDataset(chatml_model, [sample])[0]
    assert (item.prompt, item.target) == (
        "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", "A blorvin.<|im_end|>\n")


def test_a_template_that_rewrites_earlier_turns_is_refused(chatml_model: MultimodalLLM) -> None:
    odd = "{% if add_generation_prompt %}Q: {% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(MMComposeError, match="cannot be separated"):
        format_conversation(TURNS, "chat", chatml_model.tokenizer, odd)


def test_chat_without_a_tokenizer_template_is_a_one_line_error(llama_base: Path) -> None:
    with pytest.raises(MMComposeError) as error:
        MultimodalLLM.from_base(llama_base, [tiny_modality("image")], template="chat")
    assert str(error.value) == (f"template 'chat': the tokenizer of {llama_base} has no chat template; choose one of "
                                "plain, tagged, vicuna_v1")


def test_spec_records_the_text_only_for_chat() -> None:
    with pytest.raises(ValueError, match="chat_template"):
        ModelSpec(modalities=[], template="chat")
    with pytest.raises(ValueError, match="chat_template"):
        ModelSpec(modalities=[], template="plain", chat_template=CHATML)


def test_default_template(tmp_path: Path, llama_base: Path) -> None:
    assert default_template(chat_base(tmp_path / "qwen-base", CHATML)) == "chat"
    assert default_template(llama_base) == "tagged"
    assert default_template(chat_base(tmp_path / "vicuna-7b", INST, "llama")) == "vicuna_v1"


def test_composition_keeps_the_chat_template(chatml_model: MultimodalLLM, tmp_path: Path) -> None:
    def saved(modality: str, chat_template: str | None) -> Path:
        model = MultimodalLLM.from_base(chatml_model.base_path, [tiny_modality(modality)], strategy="decoupled",
                                        rank=2, alpha=4.0, template="chat", chat_template=chat_template)
        return save_checkpoint(model, tmp_path / f"{modality}-{len(model.spec.chat_template)}")

    image, audio, other = saved("image", None), saved("audio", None), saved("point", INST)
    composed = load_checkpoint(compose(parse_config({"method": "damc", "models": [{"path": str(image)},
                                                                                  {"path": str(audio)}]}),
                                       tmp_path / "composed", progress=False))
    assert (composed.spec.template, composed.spec.chat_template) == ("chat", CHATML)
    with pytest.raises(CompositionError, match="differ in chat_template"):
        compose(parse_config({"method": "damc", "models": [{"path": str(image)}, {"path": str(other)}]}),
                tmp_path / "refused")
