"""Step-wise decoding: rows joining and leaving a running batch decode exactly as alone; a prefill in chunks gives
the one-forward prefill; no warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mmcompose.model import Example, MultimodalLLM
from mmcompose.model.assembly import Batch
from mmcompose.model.generation import choose, decode, feed, prefill, step
from tests.model.helpers import random_input, randomize_deltas, tiny_modality


def _model(base: Path) -> MultimodalLLM:
    model = MultimodalLLM.from_base(base, [tiny_modality(m, boundary=2) for m in ("image", "point")],
                                    strategy="decoupled", rank=4, alpha=8.0)
    randomize_deltas(model, seed=3, scale=0.3)
    return model.eval()


def _examples() -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    return [
        Example(prompt="USER: <image>\n<point>\nwhat do they share? ASSISTANT:",
                inputs={"image": [random_input("image", generator)], "point": [random_input("point", generator)]}),
        Example(prompt="USER: hello there, what lives in the desert? ASSISTANT:"),
        Example(prompt="USER: <point> red? ASSISTANT:", inputs={"point": [random_input("point", generator)]}),
    ]


def _greedy_alone(model: MultimodalLLM, example: Example, count: int) -> list[int]:
    state, logits = prefill(model, model.assemble([example], padding_side="left"))
    tokens = [int(logits.argmax(-1))]
    for _ in range(count - 1):
        logits = step(model, state, torch.tensor(tokens[-1:]))
        tokens.append(int(logits.argmax(-1)))
    return tokens


@torch.no_grad()
def test_rows_joining_and_leaving_between_steps_decode_as_alone(llama_base: Path) -> None:
    model = _model(llama_base)
    model.fold_text_route()
    first, second, third = _examples()
    expected = {index: _greedy_alone(model, example, 10) for index, example in enumerate((first, second, third))}
    # row 0 starts alone; rows 1 and 2 (different prompt lengths) join after 3 steps; row 0 leaves after 6
    state, logits = prefill(model, model.assemble([first], padding_side="left"))
    rows, tokens = [0], {0: [], 1: [], 2: []}
    for count in range(14):
        chosen = logits.argmax(-1)
        for row, token in zip(rows, chosen.tolist(), strict=True):
            tokens[row].append(token)
        if count == 2:
            joined, joined_logits = prefill(model, model.assemble([second, third], padding_side="left"))
            state.extend(joined)
            rows += [1, 2]
            new = joined_logits.argmax(-1)
            tokens[1].append(int(new[0]))
            tokens[2].append(int(new[1]))
            chosen = torch.cat([chosen, new])
        if count == 5:
            state.keep(torch.tensor([1, 2]))
            rows, chosen = [1, 2], chosen[1:]
        logits = step(model, state, chosen)
    assert tokens[0] == expected[0][:6]
    assert tokens[1][:10] == expected[1]
    assert tokens[2][:10] == expected[2]


@torch.no_grad()
def test_a_prefill_in_chunks_continues_as_one_forward(llama_base: Path) -> None:
    """Chunks of 1, 3 and 5 positions cut through the modality inputs (routes split across chunks) and through
    the left padding of the shorter rows (a chunk of padding alone included), folded and not."""
    model = _model(llama_base)
    batch = model.assemble(_examples(), padding_side="left")
    for folded in (False, True):
        if folded:
            model.fold_text_route()
        whole, whole_logits = prefill(model, batch, None)
        expected = decode(model, whole, whole_logits, 8)
        for size in (1, 3, 5):
            forwards: list[int] = []
            counting = model.llm.register_forward_pre_hook(lambda module, args, seen=forwards: seen.append(1))
            state, logits = prefill(model, batch, size)
            counting.remove()
            assert len(forwards) == -(-batch.embeds.shape[1] // size)
            torch.testing.assert_close(logits, whole_logits, rtol=1e-5, atol=1e-5)
            assert state.length == batch.embeds.shape[1]
            assert decode(model, state, logits, 8) == expected


@torch.no_grad()
def test_feeding_in_chunks_continues_as_one_forward(llama_base: Path) -> None:
    """A chat turn's new positions (here: the rest of a prompt after its first 4, the two modality inputs among
    them) fed in chunks of 2 give the logits and the continuation of feeding them at once."""
    model = _model(llama_base)
    batch = model.assemble(_examples()[:1], padding_side="left")
    head = Batch(batch.embeds[:, :4], batch.attention_mask[:, :4], batch.position_ids[:, :4], batch.routes[:, :4],
                 None)
    results, forwards = [], []
    model.llm.register_forward_pre_hook(lambda module, args: forwards.append(1))
    for size in (None, 2):
        state, _ = prefill(model, head)
        forwards.clear()
        logits = feed(model, state, batch.embeds[:, 4:], batch.routes[:, 4:], size)
        assert len(forwards) == (1 if size is None else -(-(batch.embeds.shape[1] - 4) // size))
        results.append((logits, state.length, decode(model, state, logits, 8)))
    (whole, whole_length, whole_tokens), (chunked, length, tokens) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert (length, tokens) == (whole_length, whole_tokens)


def test_the_lm_head_gets_the_last_position_with_ordinary_strides(llama_base: Path) -> None:
    """transformers slices the last position out of the whole sequence's hidden states; torch's CPU bfloat16
    `F.linear` of that slice against a frozen weight copies the weight first (seconds at a 32000-token vocabulary),
    so the LM head must be handed the rows with the strides of a tensor of their own shape."""
    model = MultimodalLLM.from_base(llama_base, [tiny_modality(m) for m in ("image", "point")],
                                    dtype=torch.bfloat16).eval()
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    model.llm.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append((tuple(args[0].shape), args[0].stride())))
    with torch.no_grad():
        prefill(model, model.assemble(_examples()[:1], padding_side="left"))
    (shape, stride), = seen
    hidden = model.llm.config.hidden_size
    assert shape == (1, 1, hidden)
    assert stride == (hidden, hidden, 1)


def test_generation_emits_no_warning(llama_base: Path) -> None:
    model = _model(llama_base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(model.generate(_examples(), max_new_tokens=4)) == 3


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {int(choose(logits, 1.0, top_p=0.7, generator=generator)) for _ in range(200)}
    assert drawn == {0, 1}
    assert int(choose(logits, 1.0, top_p=0.4, generator=generator)) == 0
