"""merge_tensor: the chunked, buffer-reusing merge of full fine-tunes equals the in-memory operators."""

from __future__ import annotations

import pytest
import torch

from mmcompose.compose.llm_merge import Scratch, merge_tensor
from mmcompose.compose.operators import CHUNK, METHODS

LAMBDAS = [0.5, 0.3, 0.2]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("linear", {}),
        ("ties", {"density": 0.4}),
        ("ties", {"density": [0.2, 0.9, 0.5], "normalize": "none"}),
        ("magnitude_prune", {"density": 0.3}),
        ("dare_ties", {"density": 0.5}),  # the whole tensor as one chunk, bigger than the reused buffer
    ],
)
def test_merge_tensor_equals_the_in_memory_operator(name, params):
    # bf16 fine-tunes of a bf16 base: their deltas tie a lot in magnitude, also across chunk boundaries.
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(3, CHUNK // 2 + 5, generator=g) * 0.02).bfloat16()
    tuned = [(base.float() + 0.002 * torch.randn(base.shape, generator=g)).bfloat16() for _ in LAMBDAS]
    scratch = Scratch()
    for _ in range(2):  # the second time with buffers left over from the first
        chunks = [(start, chunk.clone())
                  for start, chunk in merge_tensor(base, tuned, name, LAMBDAS, params, torch.Generator(), scratch)]
        assert [start for start, _ in chunks] == sorted({start for start, _ in chunks})
        merged = torch.cat([chunk for _, chunk in chunks]).view(base.shape)
        deltas = [t.float() - base.float() for t in tuned]
        expected = (base.float() + METHODS[name](deltas, LAMBDAS, params, torch.Generator())).bfloat16()
        assert merged.dtype == torch.bfloat16
        assert torch.equal(merged, expected)
