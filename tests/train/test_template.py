"""`train modality --template chat`: trained, recorded, and used the same way by chat and generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcompose.chat import ChatSession
from mmcompose.checkpoint import load_checkpoint
from mmcompose.cli import app
from mmcompose.model.assembly import Example
from mmcompose.train.trainer import build_model
from tests.model.test_chat_template import CHATML, INST, chat_base

PROMPT = "<|im_start|>user\n<point>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"


def test_train_with_the_chat_template(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = chat_base(tmp_path / "base", CHATML)
    command = ["train", "modality", "--base", str(base), "--modality", "point", "--data-root", str(world),
               "--data", str(world / "data" / "point_caption.json"), "--stage", "pretrain", "--steps", "1",
               "--batch-size", "2"]
    result = CliRunner().invoke(app, [*command, "--template", "chat", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())
    assert (manifest["model"]["template"], manifest["model"]["chat_template"]) == ("chat", CHATML)

    # The recorded template wins over the base tokenizer's current one: inference formats as training did.
    (base / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((base / "tokenizer_config.json").read_text()), "chat_template": INST}))
    if (base / "chat_template.jinja").is_file():
        (base / "chat_template.jinja").write_text(INST)
    model = load_checkpoint(tmp_path / "run" / "model")
    assert model.tokenizer.chat_template == INST and model.spec.chat_template == CHATML
    stage2 = build_model(base, ["point"], strategy="decoupled", rank=2, start_from=[tmp_path / "run" / "model"])
    assert (stage2.spec.template, stage2.spec.chat_template) == ("chat", CHATML)
    seen: list[Example] = []
    layout = model.assembler.layout

    def record(example: Example, lengths: dict[str, int]) -> tuple[list[int], list[int], list[tuple[str, int]]]:
        seen.append(example)
        return layout(example, lengths)

    monkeypatch.setattr(model.assembler, "layout", record)
    session = ChatSession(model, max_new_tokens=4)
    first = json.loads((world / "data" / "point_caption.json").read_text())[0]
    session.attach("point", world / first["modal_inputs"]["point"][0])
    session.ask("<point>\nWhat is it?")
    session.turns[0].answer = "It is a quonk."  # the untrained model's own answer, replaced to be readable
    session.ask("Where?")
    assert seen[0].prompt == PROMPT
    assert seen[1].prompt == (PROMPT + "It is a quonk.<|im_end|>\n<|im_start|>user\nWhere?<|im_end|>\n"
                              "<|im_start|>assistant\n")
    turns = [{"from": "human", "value": "<point>\nWhat is it?"}, {"from": "gpt", "value": "It is a quonk."}]
    assert model.conversation_example(turns[:1]).prompt == PROMPT
    assert model.conversation_example(turns).target == "It is a quonk.<|im_end|>\n"

    # without --template the base's chat template is the default (the base's name does not say vicuna)
    default = CliRunner().invoke(app, [*command, "-o", str(tmp_path / "default")])
    assert default.exit_code == 0, default.output
    assert load_checkpoint(tmp_path / "default" / "model").spec.template == "chat"


def test_chat_template_missing_is_a_one_line_error(llama_base: Path, world: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "modality", "--base", str(llama_base), "--modality", "point",
                                      "--data-root", str(world), "--data", str(world / "data" / "point_caption.json"),
                                      "--stage", "pretrain", "--steps", "1", "--template", "chat",
                                      "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: template 'chat': the tokenizer of {llama_base} has no chat template; "
                                     "choose one of plain, tagged, vicuna_v1")
    assert not (tmp_path / "run" / "model").exists()
