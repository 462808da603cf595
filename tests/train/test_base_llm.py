"""Base-LLM pretraining: packing, letter scoring, and a tiny end-to-end run whose output the rest can load."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmcompose.data import Sample
from mmcompose.errors import MMComposeError
from mmcompose.model import MultimodalLLM, load_base
from mmcompose.train import base_llm
from mmcompose.train.base_llm import BASE_PROFILES, BaseProfile, choice_accuracy, pack, pretrain_base
from mmcompose.train.tokenizer import train_tokenizer

TINY = BaseProfile(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seq_len=64,
                   batch_size=8, steps=30, learning_rate=3e-3, warmup_steps=3)


@pytest.fixture
def tiny_profile(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(BASE_PROFILES, "small", TINY)
    return "small"


def test_pack_opens_every_document_with_bos_and_cuts_rows() -> None:
    rows = pack([[5, 6], [7], [8, 9, 10]], [2, 0, 1], bos=1, eos=2, seq_len=4)
    assert [r.tolist() for r in rows] == [[1, 8, 9, 10], [2, 1, 5, 6], [2, 1, 7, 2]]
    assert [r.tolist() for r in pack([[5, 6]], [0], 1, 2, 3, keep_remainder=True)] == [[1, 5, 6], [2]]
    assert [r.tolist() for r in pack([[5, 6]], [0], 1, 2, 3)] == [[1, 5, 6]]


def test_choice_accuracy_picks_the_option_text_the_model_scores_highest() -> None:
    tokenizer = train_tokenizer(["USER: which? A. red B. blue ASSISTANT: blue"] * 5, vocab_size=300)
    favourite = tokenizer(" blue", add_special_tokens=False)["input_ids"][-1]

    class PrefersBlue(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[..., favourite] = 5.0
            return SimpleNamespace(logits=logits)

    question = "zork\nWhat colour is it?\nA. red\nB. blue\nC. green\nD. pink\nAnswer with one of the options."
    golds = ["A", "B", "blue", "pink"]  # gold given as a letter or as the option's text: 2 of 4 are "blue"
    samples = [Sample(id=str(i), conversations=[{"from": "human", "value": question}, {"from": "gpt", "value": gold}])
               for i, gold in enumerate(golds)]
    assert choice_accuracy(PrefersBlue(), tokenizer, samples) == 0.5


def test_pretrain_base_learns_saves_and_is_usable(world: Path, tmp_path: Path, tiny_profile: str) -> None:
    corpus = world / "corpus"
    metrics = pretrain_base(corpus / "train.txt", corpus / "valid.txt", tmp_path / "base", profile=tiny_profile,
                            seed=1, text_qa=world / "data" / "text_qa.json", progress=False)
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] - 1.0
    assert metrics["valid_perplexity"] > 1.0 and 0.0 <= metrics["text_qa_accuracy"] <= 1.0
    assert metrics["text_qa_count"] == len(json.loads((world / "data" / "text_qa.json").read_text()))
    assert json.loads((tmp_path / "base" / base_llm.METRICS_FILE).read_text()) == metrics
    llm, tokenizer = load_base(tmp_path / "base")
    assert llm.config.hidden_size == TINY.hidden_size and tokenizer.bos_token_id is not None
    model = MultimodalLLM.from_base(tmp_path / "base", ["image"], strategy="decoupled", rank=2, alpha=4.0)
    assert model.llm.config.num_hidden_layers == TINY.num_layers

    again = pretrain_base(corpus / "train.txt", corpus / "valid.txt", tmp_path / "again", profile=tiny_profile,
                          seed=1, progress=False)
    assert again["train_loss"] == metrics["train_loss"]
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("base", "again")]
    assert weights[0] == weights[1]


def test_pretrain_base_refuses_bad_requests(world: Path, tmp_path: Path) -> None:
    corpus = world / "corpus"
    with pytest.raises(MMComposeError, match="unknown base profile"):
        pretrain_base(corpus / "train.txt", corpus / "valid.txt", tmp_path / "x", profile="huge")  # type: ignore[arg-type]
    (tmp_path / "taken").mkdir()
    with pytest.raises(MMComposeError, match="already exists"):
        pretrain_base(corpus / "train.txt", corpus / "valid.txt", tmp_path / "taken", profile="small")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(MMComposeError, match="empty"):
        pretrain_base(tmp_path / "empty.txt", corpus / "valid.txt", tmp_path / "y", profile="small")


@pytest.mark.slow
def test_small_profile_end_to_end(world: Path, tmp_path: Path) -> None:
    corpus = world / "corpus"
    metrics = pretrain_base(corpus / "train.txt", corpus / "valid.txt", tmp_path / "base", profile="small",
                            text_qa=world / "data" / "text_qa.json", progress=False)
    assert metrics["train_loss"][-1] < 1.0 < metrics["train_loss"][0]
    assert metrics["vocab_size"] == BASE_PROFILES["small"].vocab_size
