"""`mmcompose chat`: one-shot and interactive answers equal the model API's on the same conversation."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmcompose.chat import ChatSession, TextStream, run_repl
from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.cli import app
from mmcompose.errors import InputError
from mmcompose.model import MultimodalLLM, modality_spec
from tests.model.helpers import randomize_deltas

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = MultimodalLLM.from_base(llama_base, [modality_spec("image")], strategy="decoupled")
    randomize_deltas(model, scale=0.5)  # so the image and the deltas change what the model says
    return save_checkpoint(model, tmp_path_factory.mktemp("chat") / "image-model")


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> MultimodalLLM:
    return load_checkpoint(checkpoint).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("images")
    paths = []
    for seed in range(2):
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        paths.append(directory / f"photo{seed}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def expected_answer(model: MultimodalLLM, turns: list[dict[str, str]], images: list[Path], **options) -> str:
    """What the model API answers to a conversation, independently of the chat code."""
    example = model.conversation_example(turns, {"image": images} if images else None)
    return model.generate([example], MAX_NEW_TOKENS, **options)[0].strip()


def scripted(items: list[str]) -> Callable[[str], str]:
    """A stand-in for `input()` that replays `items`, then signals end of input."""
    feed = iter(items)

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read


def repl(model: MultimodalLLM, items: list[str], **options) -> tuple[ChatSession, str, str]:
    session = ChatSession(model, max_new_tokens=MAX_NEW_TOKENS, **options)
    out, err = io.StringIO(), io.StringIO()
    run_repl(session, out, err, read=scripted(items))
    return session, out.getvalue(), err.getvalue()


def test_one_shot_prints_what_generate_returns(checkpoint: Path, model: MultimodalLLM, images: list[Path]) -> None:
    expected = expected_answer(model, [{"from": "human", "value": "<image>\nwhat is this?"}], images[:1])
    assert expected  # the check below means something only if the model says something
    result = CliRunner().invoke(app, ["chat", "--model", str(checkpoint), "--input", f"image={images[0]}",
                                      "--max-new-tokens", str(MAX_NEW_TOKENS), "what is this?"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_one_shot_sampling_is_seeded(checkpoint: Path, model: MultimodalLLM, images: list[Path]) -> None:
    arguments = ["chat", "--model", str(checkpoint), "--input", f"image={images[0]}", "--max-new-tokens",
                 str(MAX_NEW_TOKENS), "--temperature", "1.5", "--seed", "7", "describe it"]
    first, second = (CliRunner().invoke(app, arguments) for _ in range(2))
    expected = expected_answer(model, [{"from": "human", "value": "<image>\ndescribe it"}], images[:1],
                               temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout == expected + "\n"


def test_placeholders_in_the_question_are_kept_and_checked(model: MultimodalLLM, images: list[Path]) -> None:
    session = ChatSession(model, max_new_tokens=MAX_NEW_TOKENS)
    session.attach("image", images[0])
    answer = session.ask("compare <image> with nothing")
    assert session.turns[0].human == "compare <image> with nothing"
    assert answer == expected_answer(model, [{"from": "human", "value": "compare <image> with nothing"}], images[:1])
    session.attach("image", images[1])
    with pytest.raises(InputError, match=r"message: has 2 <image> placeholder\(s\) but 1 image input"):
        session.ask("<image> or <image>?")
    assert len(session.turns) == 1 and len(session.pending["image"]) == 1  # nothing kept, attachment still waits


def test_streamed_text_is_the_decoded_answer_even_for_multibyte_characters(model: MultimodalLLM) -> None:
    text = " héllo wörld ✓ 東京 done"
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    stream = TextStream(model.tokenizer, pieces.append)
    for token in [*ids, model.tokenizer.eos_token_id]:
        stream(0, token)
    stream.finish()
    assert "".join(pieces) == text.strip()
    assert len(pieces) > 3 and not any("\ufffd" in piece for piece in pieces)


def full_length(model: MultimodalLLM, turns: list[dict[str, str]], images: list[Path]) -> int:
    """Positions of the whole conversation, as a fresh prefill lays it out."""
    example = model.conversation_example(turns, {"image": images} if images else None)
    return model.assemble([example]).embeds.shape[1]


def test_two_turns_carry_the_first_answer_and_both_inputs(model: MultimodalLLM, images: list[Path]) -> None:
    session, out, err = repl(model, [f"/image {images[0]}", "what is this?", f"/image {images[1]}",
                                     "and this one?"])
    assert err == ""
    first = expected_answer(model, [{"from": "human", "value": "<image>\nwhat is this?"}], images[:1])
    turns = [{"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": first},
             {"from": "human", "value": "<image>\nand this one?"}]
    second = expected_answer(model, turns, images)
    assert [turn.answer for turn in session.turns] == [first, second]
    assert f"\n{first}\n" in out and f"\n{second}\n" in out
    assert first in model.conversation_example(turns).prompt  # the second turn reads the first answer
    processed = torch.stack([model.processors["image"](path) for path in images])
    encoded = model.encode("image", processed)
    kept = [tensor for turn in session.turns for tensor in turn.inputs["image"]]
    assert len(kept) == 2 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(kept, encoded, strict=True))


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("attach_at", [0, 2])
def test_the_cache_is_kept_across_turns_and_answers_as_a_fresh_prefill(
        checkpoint: Path, images: list[Path], attach_at: int) -> None:
    """Three turns with one image attached (to the first turn, or to the third, whose image then takes its
    modality route after two turns of text): one encoder pass, each turn prefills only what it adds, and
    every answer equals a fresh prefill of the whole conversation (greedy)."""
    model = load_checkpoint(checkpoint).eval()
    encoder_calls = count_calls(model.branches["image"].encoder)
    llm_calls = count_calls(model.llm)
    session = ChatSession(model, max_new_tokens=MAX_NEW_TOKENS)
    questions = ["what is this?", "and its colour?", "where does it live?"]
    turns: list[dict[str, str]] = []
    for index, question in enumerate(questions):
        if index == attach_at:
            session.attach("image", images[0])
            question = f"<image>\n{question}"
        answer = session.ask(question)
        turns.append({"from": "human", "value": question})
        assert encoder_calls[0] == (index >= attach_at) and llm_calls[0] <= (index + 1) * MAX_NEW_TOKENS
        calls = encoder_calls[0], llm_calls[0]
        expected = expected_answer(model, turns, images[:1] if index >= attach_at else [])
        encoder_calls[0], llm_calls[0] = calls  # the reference's own forwards are not the session's
        assert answer == expected
        turns.append({"from": "gpt", "value": answer})
    answers = [turn.answer for turn in session.turns]
    assert len(set(answers)) == 3 and all(answers)  # the model says different things, so equality means something
    # a later turn prefills at most what follows the earlier prompt: the last answer (where its generated
    # tokens differ from its text's) and the new turn; never the earlier turns again
    for index in (1, 2):
        before = full_length(model, turns[:2 * index - 1], images[:1] if index - 1 >= attach_at else [])
        now = full_length(model, turns[:2 * index + 1], images[:1] if index >= attach_at else [])
        assert 0 < session.prefilled[index] <= now - before
    assert session.prefilled[0] == full_length(model, turns[:1], images[:1] if attach_at == 0 else [])


def test_an_interrupted_answer_drops_the_cache_and_the_next_turn_starts_afresh(model: MultimodalLLM,
                                                                               images: list[Path]) -> None:
    session = ChatSession(model, max_new_tokens=MAX_NEW_TOKENS)
    session.attach("image", images[0])
    first = session.ask("what is this?")

    def interrupt(piece: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("tell me more", on_text=interrupt)
    assert len(session.turns) == 1 and len(session.prefilled) == 1
    answer = session.ask("and its colour?")
    turns = [{"from": "human", "value": "<image>\nwhat is this?"}, {"from": "gpt", "value": first},
             {"from": "human", "value": "and its colour?"}]
    assert answer == expected_answer(model, turns, images[:1])
    assert session.prefilled[-1] == full_length(model, turns, images[:1])  # the whole conversation again


def test_bad_attachments_print_one_line_and_the_session_goes_on(model: MultimodalLLM, images: list[Path],
                                                               tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(images[0].read_bytes()[:60])
    session, _, err = repl(model, ["/image missing.png", f"/image {corrupt}", f"/audio {images[0]}",
                                     "/video", "/frobnicate", "hello"])
    messages = err.splitlines()
    assert len(messages) == 5 and all(line.startswith("error: ") for line in messages)
    assert "missing.png: no such file" in messages[0]
    assert "corrupt.png" in messages[1]
    assert "modality 'audio', which this model does not have" in messages[2]
    assert "/video needs a file path" in messages[3]
    assert "unknown command /frobnicate" in messages[4]
    assert len(session.turns) == 1 and session.turns[0].human == "hello" and session.turns[0].inputs == {}
    assert session.turns[0].answer == expected_answer(model, [{"from": "human", "value": "hello"}], [])


def test_reset_starts_a_new_conversation(model: MultimodalLLM, images: list[Path]) -> None:
    session, _, _ = repl(model, [f"/image {images[0]}", "what is this?", "/reset", "hello", "/quit", "unread"])
    assert [turn.human for turn in session.turns] == ["hello"]
    assert session.turns[0].answer == expected_answer(model, [{"from": "human", "value": "hello"}], [])


def test_interactive_cli_exits_cleanly_at_end_of_input(checkpoint: Path, model: MultimodalLLM,
                                                       images: list[Path]) -> None:
    result = CliRunner().invoke(app, ["chat", "--model", str(checkpoint), "--input", f"image={images[0]}",
                                      "--max-new-tokens", str(MAX_NEW_TOKENS)], input="what is this?\n")
    assert result.exit_code == 0, result.output
    expected = expected_answer(model, [{"from": "human", "value": "<image>\nwhat is this?"}], images[:1])
    assert f"{expected}\n" in result.stdout


def test_cli_refuses_a_modality_the_model_lacks(checkpoint: Path, images: list[Path]) -> None:
    result = CliRunner().invoke(app, ["chat", "--model", str(checkpoint), "--input", f"audio={images[0]}", "hi"])
    assert result.exit_code == 2
    assert "which this model does not have" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_inputs_follow_the_models_modalities_not_a_fixed_list(llama_base: Path, images: list[Path],
                                                               tmp_path: Path) -> None:
    """A modality named `photo` (as composition's rename makes) takes files from --input and /photo."""
    spec = modality_spec("image").model_copy(update={"name": "photo", "placeholder": "<photo>"})
    renamed = MultimodalLLM.from_base(llama_base, [spec], strategy="decoupled")
    randomize_deltas(renamed, scale=0.5)
    path = renamed.save_pretrained(tmp_path / "photo-model")
    model = load_checkpoint(path).eval()
    example = model.conversation_example([{"from": "human", "value": "<photo>\nwhat is this?"}], {"photo": images[:1]})
    expected = model.generate([example], MAX_NEW_TOKENS)[0].strip()
    assert expected
    result = CliRunner().invoke(app, ["chat", "--model", str(path), "-i", f"photo={images[0]}",
                                      "--max-new-tokens", str(MAX_NEW_TOKENS), "what is this?"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    _, out, err = repl(model, [f"/photo {images[0]}", "/quit"])
    assert "/photo PATH attaches a file" in out and "attached photo" in out and not err
    bad = CliRunner().invoke(app, ["chat", "--model", str(path), "--input", str(images[0]), "hi"])
    assert bad.exit_code == 2 and "--input expects MODALITY=PATH" in bad.stderr


@pytest.mark.slow  # the executable imports torch and transformers afresh: ~10 s on 2 busy cores
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_answers_stream_to_a_real_terminal(checkpoint: Path, model: MultimodalLLM, images: list[Path],
                                           tmp_path: Path) -> None:
    """The installed executable, in a real pseudo-terminal: the prompt, the answer, and /quit.

    The random model's answer holds arbitrary characters (combining marks, right-to-left text, U+FFFD), which
    tmux lays out in cells its own way; so the expected screen is tmux's rendering of the expected text, printed
    by `cat` in a second pane of the same size, and the chat pane must show exactly that."""
    executable = Path(sys.executable).with_name("mmcompose")
    expected = expected_answer(model, [{"from": "human", "value": "<image>\nwhat is this?"}], images[:1])
    reference = tmp_path / "expected.txt"
    reference.write_text(f"> what is this?\n{expected}\n>", encoding="utf-8")
    socket = f"mmcompose-chat-test-{tmp_path.name}"
    tmux = ["tmux", "-L", socket]
    command = f"{executable} chat --model {checkpoint} --input image={images[0]} --max-new-tokens {MAX_NEW_TOKENS}"
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "50", "-s", "chat",
                    f"{command}; echo EXIT=$?; sleep 30"], check=True)
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "50", "-s", "reference",
                    f"cat {reference}; sleep 30"], check=True)
    try:
        rendered = wait_for(tmux, lambda text: text.endswith(">"), target="reference")
        assert rendered.startswith("> what is this?\n") and len(rendered.splitlines()) >= 3
        wait_for(tmux, lambda text: text.endswith(">"))
        subprocess.run([*tmux, "send-keys", "-t", "chat", "what is this?", "Enter"], check=True)
        screen = wait_for(tmux, lambda text: text.count("\n>") >= 2)
        assert screen.endswith("\n" + rendered)
        subprocess.run([*tmux, "send-keys", "-t", "chat", "/quit", "Enter"], check=True)
        wait_for(tmux, lambda text: "EXIT=0" in text)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)


def wait_for(tmux: list[str], ready: Callable[[str], bool], timeout: float = 30.0, target: str = "chat") -> str:
    """The pane's text (trailing blanks dropped) once `ready(text)` holds, failing with it after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        screen = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-t", target], capture_output=True,
                                text=True, check=True).stdout
        text = "\n".join(line.rstrip() for line in screen.splitlines()).rstrip()
        if ready(text):
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"terminal never got there; it shows:\n{text}")
        time.sleep(0.1)


def test_the_sampler_is_made_where_the_logits_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits on `meta` stand for a GPU's (or, under a device map, the LM head's, which need not be the
    embeddings'): the session's generator must be made there, once, and only when it samples."""
    made: list[tuple[torch.device, int]] = []

    class Recording:
        def __init__(self, device: torch.device | str = "cpu") -> None:
            self.device = torch.device(device)

        def manual_seed(self, seed: int) -> Recording:
            made.append((self.device, seed))
            return self

    monkeypatch.setattr(torch, "Generator", Recording)
    logits = torch.zeros(1, 10, device="meta")
    greedy = ChatSession(model=None, temperature=0.0, seed=3)  # type: ignore[arg-type]
    assert greedy._sampler(logits) is None
    sampled = ChatSession(model=None, temperature=0.8, seed=3)  # type: ignore[arg-type]
    first = sampled._sampler(logits)
    assert sampled._sampler(logits) is first  # one generator for the session, not re-seeded each turn
    assert made == [(torch.device("meta"), 3)]
