"""Step-wise cached decoding shared by `MultimodalLLM.generate` and the server's dynamic batcher.

A `DecodeState` holds rows being decoded together: a transformers `DynamicCache` (the current cache API: the
forward's `cache=` argument and the output's `.cache`), the attention mask over cache + next token, and each
row's next position. Rows are left padded, so every row's next token sits in the same, last column. Rows can
leave (`keep`) and join (`extend`) between steps: joining pads the shorter side's cache and mask on the left
with masked-out columns, and leaving drops the rows and any leading column no remaining row attends to.

A state also outlives one answer: `crop` cuts it back to a prefix and `feed` appends positions with their routes,
so a chat session prefills only what a new turn adds to the conversation already in the cache.

Compared with transformers' `generate`: no logits processors, stopping criteria or per-step input preparation
(each step is one embedding lookup, one mask column and one forward); routes apply to the prefill (and `feed`)
only, since every generated token is text. The cache is built without the model config, so every layer is a
`DynamicLayer` (full attention, position-aligned across rows; here `ReservedLayer`, which writes into room reserved
for the prompt and the answer), which is what joining and trimming rows need;
a sliding-window model still attends within its window, because the mask, not the cache, enforces it. Prompts
are prefilled in chunks of `PREFILL_CHUNK_SIZE` positions, where transformers prefills in one forward unless
`prefill_chunk_size` is set: a multimodal prompt runs to thousands of positions (an MCUB-4 item of the released
models: ~3,400), and one forward's activations over all of them are what would set the peak memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mmcompose.model.assembly import Batch

if TYPE_CHECKING:
    from mmcompose.model.mllm import MultimodalLLM

PREFILL_CHUNK_SIZE = 1024
"""Positions per forward of a prefill (transformers' `prefill_chunk_size`, which defaults to no chunks). Measured on
one decoder layer at vicuna-7b's widths in bfloat16 over an MCUB-4 prompt of 3,404 positions: the prefill's peak
above the loaded model falls from 0.55 GiB in one forward to 0.43 GiB in chunks of 2048 and 0.35 GiB in chunks of
1024 (16 layers: `mmcompose eval` of two such items peaked at 1.133x the model's bytes with chunks, 1.194x before
them and the LM head's fix in `mmcompose.model.mllm`); its CPU time rises by 2-10% (noisy: a loaded machine)."""


@dataclass
class DecodeState:
    """Rows decoded together: their cache, the mask over it and each row's next position `(rows, 1)`."""

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices, in order), then drop leading columns that no kept row attends to."""
        self.mask, self.positions = self.mask[rows], self.positions[rows]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        attended = self.mask.any(0).nonzero()
        start = int(attended[0]) if len(attended) else self.mask.shape[1]
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def extend(self, other: DecodeState) -> None:
        """Append `other`'s rows after ours, left padding whichever side is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(tensor: torch.Tensor, dim_from_end: int, length: int) -> torch.Tensor:
            missing = width - length
            return tensor if missing == 0 else F.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0))

        mine, theirs = self.mask.shape[1], other.mask.shape[1]
        self.mask = torch.cat([pad(self.mask, 1, mine), pad(other.mask, 1, theirs)])
        self.positions = torch.cat([self.positions, other.positions])
        for layer, incoming in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.keys = torch.cat([pad(layer.keys, 2, mine), pad(incoming.keys, 2, theirs)])
            layer.values = torch.cat([pad(layer.values, 2, mine), pad(incoming.values, 2, theirs)])

    @property
    def length(self) -> int:
        """Columns in the cache (padding included)."""
        return self.mask.shape[1]

    def crop(self, length: int) -> None:
        """Keep only the first `length` columns (a prefix shared with what comes next); each row's next position
        is then its count of attended columns."""
        self.mask = self.mask[:, :length]
        self.positions = self.mask.sum(-1, keepdim=True)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


class ReservedLayer(DynamicLayer):
    """A cache layer that writes new positions into room reserved for `capacity` of them, where transformers'
    `DynamicLayer` concatenates.

    Concatenating copies the layer's whole cache at every update and frees the old copy: a prefill in chunks leaves
    one freed, shorter copy of every layer's keys and values behind each chunk, holes between the layers' live
    caches that the allocator keeps, and every decoded token copies the whole cache. Here the first update allocates
    `capacity` positions and every later one writes into them; `keys` and `values` are views of the written part.
    Once something else has replaced them (`DecodeState.keep` and `extend` make new tensors for other rows) or the
    room is full, it concatenates as `DynamicLayer` does, and the room goes with the old tensors. transformers'
    `StaticLayer` reserves as well, but never grows past its size and has the mask padded to it. Measured: `mmcompose
    eval` of two MCUB-4 items on 16 layers at vicuna-7b's widths peaked at 1.133x the model's bytes with a growing
    cache, 1.098x with this one.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._room = tuple(states.new_empty(*states.shape[:2], self.capacity, states.shape[-1])
                               for states in (key_states, value_states))
            self.keys, self.values = (room[:, :, :0] for room in self._room)
        length, count = self.keys.shape[-2], key_states.shape[-2]
        room = self._room
        if room is None or not _prefix_of(self.keys, room[0]) or length + count > self.capacity:
            self._room = None
            return super().update(key_states, value_states)
        room[0][:, :, length:length + count] = key_states
        room[1][:, :, length:length + count] = value_states
        self.keys, self.values = room[0][:, :, :length + count], room[1][:, :, :length + count]
        return self.keys, self.values


def _prefix_of(tensor: torch.Tensor, room: torch.Tensor) -> bool:
    """Whether `tensor` is `room[:, :, :n]` for some `n` (all rows, from the first position on)."""
    return (tensor.untyped_storage().data_ptr() == room.untyped_storage().data_ptr()
            and tensor.storage_offset() == room.storage_offset() and tensor.stride() == room.stride()
            and tensor.shape[:2] == room.shape[:2])


def reserved_cache(model: MultimodalLLM, capacity: int) -> DynamicCache:
    """A `DynamicCache` whose layers reserve room for `capacity` positions (`ReservedLayer`)."""
    cache = DynamicCache()
    cache.layers = [ReservedLayer(capacity) for _ in range(model.llm.config.get_text_config().num_hidden_layers)]
    return cache


def prefill(model: MultimodalLLM, batch: Batch, chunk_size: int | None = PREFILL_CHUNK_SIZE,
            reserve: int = 0) -> tuple[DecodeState, torch.Tensor]:
    """Run a left-padded prompt batch with its routes into a fresh cache with room for the prompt and `reserve`
    positions more, at most `chunk_size` positions per forward (None: all at once); return the state and the last
    position's logits `(rows, vocab)` in float32.

    A chunk attends to the cache of the chunks before it and to itself, so chunks give the one-forward prefill up to
    rounding; what they bound is memory: a forward's activations grow with its positions, the cache does not."""
    length = batch.embeds.shape[1]
    size = chunk_size or length
    cache = reserved_cache(model, length + reserve)
    for start in range(0, length, size):
        stop = min(start + size, length)
        with model.routing.route(batch.routes[:, start:stop]):
            out = model.llm(inputs_embeds=batch.embeds[:, start:stop], attention_mask=batch.attention_mask[:, :stop],
                            position_ids=batch.position_ids[:, start:stop], cache=cache, use_cache=True,
                            logits_to_keep=1)
        cache = out.cache
    state = DecodeState(cache=cache, mask=batch.attention_mask, positions=batch.position_ids[:, -1:] + 1)
    return state, out.logits[:, -1].float()


def feed(model: MultimodalLLM, state: DecodeState, embeds: torch.Tensor, routes: torch.Tensor | None,
         chunk_size: int | None = PREFILL_CHUNK_SIZE) -> torch.Tensor:
    """Append `n` positions per row (`embeds (rows, n, hidden)`, `routes (rows, n)`, None: all text) to the cache,
    at most `chunk_size` per forward as `prefill`; return the last position's logits `(rows, vocab)` in float32."""
    count = embeds.shape[1]
    size = chunk_size or count
    for start in range(0, count, size):
        stop = min(start + size, count)
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.rows, stop - start)], dim=1)
        positions = state.positions + torch.arange(stop - start, device=state.positions.device)
        with model.routing.route(None if routes is None else routes[:, start:stop]):
            out = model.llm(inputs_embeds=embeds[:, start:stop], attention_mask=state.mask, position_ids=positions,
                            cache=state.cache, use_cache=True, logits_to_keep=1)
        state.positions = positions[:, -1:] + 1
    return out.logits[:, -1].float()


def step(model: MultimodalLLM, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one text token per row (`(rows,)`); return the next logits `(rows, vocab)` in float32."""
    return feed(model, state, model.llm.get_input_embeddings()(tokens).unsqueeze(1), None)


def decode(model: MultimodalLLM, state: DecodeState, logits: torch.Tensor, max_new_tokens: int, *,
           temperature: float = 0.0, generator: torch.Generator | None = None,
           on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Choose up to `max_new_tokens` tokens per row from the prefill's `logits`, stepping the state; rows that
    reached EOS leave it. Returns each row's tokens (its EOS included). The last chosen token is never fed, so
    with one row the cache ends up holding the prompt and every chosen token but the last."""
    eos = model.tokenizer.eos_token_id
    tokens: list[list[int]] = [[] for _ in range(state.rows)]
    active = list(range(state.rows))
    for count in range(max_new_tokens):
        chosen = choose(logits, temperature, generator=generator)
        for row, token in zip(active, chosen.tolist(), strict=True):
            tokens[row].append(token)
            if on_token is not None:
                on_token(row, token)
        running = [index for index, token in enumerate(chosen.tolist()) if token != eos]
        if not running or count + 1 == max_new_tokens:
            break
        if len(running) < len(active):
            keep = torch.tensor(running, device=chosen.device)
            state.keep(keep)
            chosen = chosen[keep]
            active = [active[index] for index in running]
        logits = step(model, state, chosen)
    return tokens


def choose(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy at temperature 0; otherwise sample from the softmax at `temperature`, restricted to the smallest
    set of tokens whose probability reaches `top_p` (nucleus sampling, as transformers' `TopPLogitsWarper`,
    which keeps at least one token). The logits are shifted to a maximum of 0 and the temperature kept at least
    the dtype's smallest normal number: a temperature such as 1e-45 made the logits inf (or 0/0, where it
    rounds to 0 in float32) and the softmax NaN; now it samples the argmax, as it should."""
    if temperature <= 0:
        return logits.argmax(-1)
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    probabilities = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
        before = sorted_probabilities.cumsum(-1) - sorted_probabilities
        sorted_probabilities = sorted_probabilities.masked_fill(before >= top_p, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probabilities)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
