"""Every assistant turn is a target, as LLaVA's masking labels a conversation (`preprocess_v1`, `preprocess_plain`
in LLaVA's `train.py`, which ModelCompose's `train_multimodal.py` keeps): a 3-turn conversation in each template,
its labels checked position by position against sequences written out here from the template strings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcompose.errors import MMComposeError
from mmcompose.model import MultimodalLLM
from mmcompose.model.assembly import IGNORE_INDEX, Example
from tests.model.helpers import random_input, tiny_modality
from tests.model.test_chat_template import CHATML, INST, chat_base

TURNS = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A blorvin."},
         {"from": "human", "value": "Where does it live?"}, {"from": "gpt", "value": "In the desert."},
         {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "It is red."}]
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions. ")
IMAGE = None  # stands for the image's positions in the layouts below


def example_of(model: MultimodalLLM, turns: list[dict[str, str]]) -> Example:
    rendered = model.render_conversation(turns)
    inputs = {"image": [random_input("image", torch.Generator().manual_seed(0))]} if "<image>" in rendered.prompt \
        else {}
    return Example(rendered.prompt, inputs, rendered.target, answers=rendered.answers, eos=rendered.eos)


def labels_of(model: MultimodalLLM, turns: list[dict[str, str]]) -> list[int]:
    return model.assemble([example_of(model, turns)]).labels[0].tolist()


def expected(model: MultimodalLLM, layout: list[tuple[str | None, bool]], eos: bool) -> list[int]:
    """Labels of `layout` ((text, is a target) pieces; None: the image), after BOS, ending with EOS if `eos`."""
    tokenizer = model.tokenizer
    labels = [IGNORE_INDEX] if tokenizer.bos_token_id is not None else []
    for text, target in layout:
        if text is None:
            labels += [IGNORE_INDEX] * model.input_length("image", random_input("image", torch.Generator()))
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        labels += ids if target else [IGNORE_INDEX] * len(ids)
    return labels + ([tokenizer.eos_token_id] if eos else [])


def test_vicuna_v1_labels_every_answer_and_its_closing_eos(llama_base: Path) -> None:
    model = MultimodalLLM.from_base(llama_base, [tiny_modality("image")], template="vicuna_v1")
    # LLaVA: "SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...", each round's " a</s>" a target
    layout = [(VICUNA_SYSTEM + "USER: ", False), (IMAGE, False), ("\nWhat is this? ASSISTANT:", False),
              (" A blorvin.</s>", True), ("USER: Where does it live? ASSISTANT:", False),
              (" In the desert.</s>", True), ("USER: Which colour? ASSISTANT:", False), (" It is red.", True)]
    labels = labels_of(model, TURNS)
    assert labels == expected(model, layout, eos=True)
    eos = model.tokenizer.eos_token_id
    assert labels.count(eos) == 3  # each answer closes with </s>, the last with the appended EOS
    targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert len(targets) == sum(len(model.tokenizer(t, add_special_tokens=False)["input_ids"])
                               for t in (" A blorvin.", " In the desert.", " It is red.")) + 3


def test_tagged_labels_every_answer(llama_base: Path) -> None:
    model = MultimodalLLM.from_base(llama_base, [tiny_modality("image")], template="tagged")
    layout = [("USER: ", False), (IMAGE, False), ("\nWhat is this? ASSISTANT:", False), (" A blorvin.\n", True),
              ("USER: Where does it live? ASSISTANT:", False), (" In the desert.\n", True),
              ("USER: Which colour? ASSISTANT:", False), (" It is red.", True)]
    assert labels_of(model, TURNS) == expected(model, layout, eos=True)


def test_plain_is_llavas_caption_layout(llama_base: Path) -> None:
    model = MultimodalLLM.from_base(llama_base, [tiny_modality("image")], template="plain")
    caption = [{"from": "human", "value": "Describe the image briefly.\n<image>"},
               {"from": "gpt", "value": "A red blorvin in the desert."}]
    # LLaVA's preprocess_plain: the human turn becomes the image token alone; the caption and "\n" are the
    # target; no role tags, no EOS
    assert model.format_conversation(caption) == ("<image>", "A red blorvin in the desert.\n")
    assert labels_of(model, caption) == expected(model, [(IMAGE, False), ("A red blorvin in the desert.\n", True)],
                                                 eos=False)
    with pytest.raises(MMComposeError, match="template 'plain' takes one human turn and its answer"):
        model.format_conversation(TURNS)


@pytest.mark.parametrize("template", ["chatml", "inst"])
def test_chat_templates_label_every_answer_with_its_end_of_turn(template: str, tmp_path: Path) -> None:
    base = chat_base(tmp_path / "base", CHATML if template == "chatml" else INST,
                     "qwen2" if template == "chatml" else "llama")
    model = MultimodalLLM.from_base(base, [tiny_modality("image")], template="chat")
    if template == "chatml":
        layout = [("<|im_start|>user\n", False), (IMAGE, False),
                  ("\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", False), ("A blorvin.<|im_end|>\n", True),
                  ("<|im_start|>user\nWhere does it live?<|im_end|>\n<|im_start|>assistant\n", False),
                  ("In the desert.<|im_end|>\n", True),
                  ("<|im_start|>user\nWhich colour?<|im_end|>\n<|im_start|>assistant\n", False),
                  ("It is red.<|im_end|>\n", True)]
    else:  # the template's leading BOS text is the assembler's BOS id; the last answer's </s> is the appended EOS
        layout = [("[INST] ", False), (IMAGE, False), ("\nWhat is this? [/INST]", False), ("A blorvin.</s>", True),
                  ("[INST] Where does it live? [/INST]", False), ("In the desert.</s>", True),
                  ("[INST] Which colour? [/INST]", False), ("It is red.", True)]
    assert labels_of(model, TURNS) == expected(model, layout, eos=True)


def test_a_conversation_ending_with_a_question_has_its_earlier_answers_as_context_only(llama_base: Path) -> None:
    model = MultimodalLLM.from_base(llama_base, [tiny_modality("image")], template="vicuna_v1")
    prompt, target = model.format_conversation(TURNS[:3])
    assert target is None and prompt == (VICUNA_SYSTEM + "USER: <image>\nWhat is this? ASSISTANT: A blorvin.</s>"
                                         "USER: Where does it live? ASSISTANT:")


def test_the_trainer_counts_every_labelled_position(llama_base: Path) -> None:
    from mmcompose.train.trainer import target_tokens

    model = MultimodalLLM.from_base(llama_base, [tiny_modality("image")], template="vicuna_v1")
    example = example_of(model, TURNS)
    labels = model.assemble([example]).labels[0]
    assert target_tokens(model, [example]) == int((labels != IGNORE_INDEX).sum())
