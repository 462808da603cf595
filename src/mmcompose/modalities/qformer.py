"""The Q-Former connector: BERT-style layers in which learned queries self-attend, then cross-attend to the
encoder tokens (BLIP-2 / Video-LLaMA); the audio connector of the released ModelCompose audio model
(`qformer_32N_2L`: 32 queries, 2 layers, bert-base width).

Names below the layer level are BERT's (`attention.self.query`, `crossattention.output.LayerNorm`,
`intermediate_query.dense`, `output_query.dense`), so official weights load by a prefix rename only
(`OFFICIAL_PREFIXES`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from mmcompose.errors import CheckpointError

#: Official `VideoLlamaAudioQformer` state-dict prefix -> ours. The official module also stores the unused
#: buffer `audio_Qformer.bert.embeddings.position_ids` (no text input ever reaches the embeddings).
OFFICIAL_PREFIXES = {
    "audio_query_tokens": "query_tokens",
    "audio_position_embedding.": "position_embedding.",
    "audio_Qformer.bert.embeddings.LayerNorm.": "query_norm.",
    "audio_Qformer.bert.encoder.layer.": "layers.",
    "audio_llama_proj.": "proj.",
}
OFFICIAL_UNUSED = ("audio_Qformer.bert.embeddings.position_ids",)
OFFICIAL_TYPE = re.compile(r"qformer_(\d+)N_(\d+)L")


class _Attention(nn.Module):
    """BERT attention with its post-LayerNorm output: LayerNorm(dense(attend(x, context)) + x)."""

    def __init__(self, width: int, context_width: int, heads: int, eps: float, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"Q-Former width {width} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.self = nn.ModuleDict(dict(query=nn.Linear(width, width), key=nn.Linear(context_width, width),
                                       value=nn.Linear(context_width, width)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(width, width), LayerNorm=nn.LayerNorm(width, eps=eps)))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = heads(self.self["query"](x)), heads(self.self["key"](context)), heads(self.self["value"](context))
        p = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(batch, length, width)
        out = F.dropout(self.output["dense"](attended), self.dropout, self.training)
        return self.output["LayerNorm"](out + x)


class _Layer(nn.Module):
    def __init__(self, width: int, context_width: int, heads: int, intermediate: int, eps: float,
                 dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.attention = _Attention(width, width, heads, eps, dropout)
        self.crossattention = _Attention(width, context_width, heads, eps, dropout)
        self.intermediate_query = nn.ModuleDict(dict(dense=nn.Linear(width, intermediate)))
        self.output_query = nn.ModuleDict(dict(dense=nn.Linear(intermediate, width),
                                               LayerNorm=nn.LayerNorm(width, eps=eps)))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.crossattention(self.attention(queries, queries), context)
        hidden = F.gelu(self.intermediate_query["dense"](x))
        out = F.dropout(self.output_query["dense"](hidden), self.dropout, self.training)
        return self.output_query["LayerNorm"](out + x)


class QFormerConnector(nn.Module):
    """`(n, T, in_dim)` encoder tokens -> `(n, num_queries, out_dim)`.

    The encoder tokens get a learned absolute position (`num_positions` rows, so T <= num_positions); the
    `num_queries` learned queries are LayerNorm-ed (no position), then each of `num_layers` post-LN layers
    runs self-attention over the queries, cross-attention from the queries to the tokens (keys and values
    project from `in_dim`, the cross-attention width, to `width`) and a GELU feed-forward of `intermediate_size`;
    a linear maps `width` to the LLM width. Nothing is masked (all encoder tokens are attended to), as in the
    official audio path. Defaults are bert-base, which the official builder hard-codes: width 768, 12 heads,
    intermediate 3072, LayerNorm eps 1e-12; dropout 0.1 in training as in BERT is `dropout=0.1` here
    (default 0: the connector is usually trained briefly, and the official eval path has none).

    Where this differs from the official `VideoLlamaAudioQformer`: its LLM width is hard-coded to 4096 (the
    Vicuna-7B width); here it is the `out_dim` of the LLM the connector serves. Its text pathway (word and
    position embeddings, the text feed-forward) is pruned there and absent here.
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, num_layers: int = 2, width: int = 768,
                 num_heads: int = 12, intermediate_size: int = 3072, num_positions: int = 1024,
                 layer_norm_eps: float = 1e-12, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_positions = num_positions
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.position_embedding = nn.Embedding(num_positions, in_dim)
        self.query_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.dropout = dropout
        self.layers = nn.ModuleList(_Layer(width, in_dim, num_heads, intermediate_size, layer_norm_eps, dropout)
                                    for _ in range(num_layers))
        self.proj = nn.Linear(width, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.num_positions:
            raise ValueError(f"the Q-Former has {self.num_positions} positions but got {length} encoder tokens")
        dtype = self.proj.weight.dtype
        positions = torch.arange(length, device=tokens.device)
        context = tokens.to(dtype) + self.position_embedding(positions)
        queries = self.query_norm(self.query_tokens.expand(tokens.shape[0], -1, -1))
        queries = F.dropout(queries, self.dropout, self.training)
        for layer in self.layers:
            queries = layer(queries, context)
        return self.proj(queries)


def official_qformer_options(kind: str, weights: dict[str, torch.Tensor], source: str) -> dict[str, int]:
    """Connector options for an official `qformer_<N>N_<L>L` projector, read from its type and its tensors.

    Shapes give the width, intermediate size and position count; the head count is not stored anywhere, and
    the official builder always uses bert-base's 12, so 12 it is (a width 12 does not divide is refused).
    """
    match = OFFICIAL_TYPE.fullmatch(kind)
    if match is None:
        raise CheckpointError(f"{source}: {kind!r} is not a qformer_<queries>N_<layers>L projector type")
    queries, layers = int(match[1]), int(match[2])
    try:
        width = weights["audio_query_tokens"].shape[-1]
        intermediate = weights["audio_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0]
        positions = weights["audio_position_embedding.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"{source}: Q-Former weights lack {error.args[0]}") from None
    if weights["audio_query_tokens"].shape[1] != queries:
        raise CheckpointError(f"{source}: projector type {kind} says {queries} queries but audio_query_tokens "
                              f"has {weights['audio_query_tokens'].shape[1]}")
    heads = 12
    if width % heads:
        raise CheckpointError(f"{source}: Q-Former width {width} is not divisible by bert-base's {heads} heads")
    return dict(num_queries=queries, num_layers=layers, width=width, num_heads=heads,
                intermediate_size=intermediate, num_positions=positions)


def rename_official(name: str) -> str | None:
    """Our parameter name for an official Q-Former key (relative to the projector), None when unused."""
    if name in OFFICIAL_UNUSED:
        return None
    for official, ours in OFFICIAL_PREFIXES.items():
        if name.startswith(official):
            return ours + name[len(official):]
    raise KeyError(name)


__all__ = ["QFormerConnector", "official_qformer_options", "rename_official"]
