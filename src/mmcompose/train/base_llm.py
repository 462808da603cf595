"""Pretrain the synthetic world's base LLM from scratch: a BPE tokenizer and a small LLaMA on the world corpus.

All of the world's knowledge lives in this model: modality models only learn to tell the LLM
*which* entity they see, and the LLM must already know that entity's attributes. So besides held-out
perplexity, the metrics include text-only attribute multiple choice, the number the rest of the experiment
stands on.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from mmcompose.data.samples import Sample, load_samples
from mmcompose.errors import MMComposeError
from mmcompose.eval.answers import parse_options
from mmcompose.files import atomic_directory
from mmcompose.model.conversation import TEMPLATES, format_conversation
from mmcompose.train.progress import progress_bar
from mmcompose.train.tokenizer import train_tokenizer

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class BaseProfile:
    """Model size and training budget.

    `prose_repeats`: how often each prose document (one that is not a dialogue, i.e. does not open with the
    chat template's `USER:`) appears per epoch. Facts live in prose; when dialogues outnumber it ten to one,
    a small model learns the dialogue surface long before it learns any fact.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    prose_repeats: int = 1
    weight_decay: float = 0.1


BASE_PROFILES: dict[str, BaseProfile] = {
    # The large world: every fact known (completion scoring) and names copied into answers after 1200 steps.
    "large": BaseProfile(vocab_size=576, hidden_size=192, num_layers=4, num_heads=6, intermediate_size=512,
                         seq_len=128, batch_size=16, steps=1200, learning_rate=2e-3, warmup_steps=40,
                         prose_repeats=6),
    # The small world (demo default and quick): most facts (text QA 0.74), common-attribute questions with names
    # 0.88 (800 steps: 0.43 and 0.53, too little for the modality models to build on).
    "small": BaseProfile(vocab_size=480, hidden_size=128, num_layers=3, num_heads=4, intermediate_size=344,
                         seq_len=128, batch_size=16, steps=1200, learning_rate=3e-3, warmup_steps=20,
                         prose_repeats=6),
}
"""Vocabulary sizes sit just below where BPE would give every plural its own token (`zevuks`): a plural is
then its singular's token plus `s`, and facts stated in the plural teach the same entity token."""


def read_documents(path: Path) -> list[str]:
    """The corpus' documents: blocks of text separated by blank lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MMComposeError(f"{path}: cannot read the corpus ({error})") from None
    documents = [block.strip() for block in text.split("\n\n") if block.strip()]
    if not documents:
        raise MMComposeError(f"{path}: the corpus is empty")
    return documents


def pack(encoded: list[list[int]], order: np.ndarray | range, bos: int, eos: int, seq_len: int,
         keep_remainder: bool = False) -> list[torch.Tensor]:
    """`<s> doc </s>` for each document in `order`, concatenated and cut into `seq_len`-token rows.

    Each document opens with `<s>` as a prompt does at inference (the assembler prepends it), so a chat
    document in the corpus reads exactly like a question asked later.
    """
    stream = torch.tensor([token for i in order for token in (bos, *encoded[i], eos)], dtype=torch.long)
    rows = list(stream.split(seq_len))
    if rows and len(rows[-1]) < seq_len and not keep_remainder:
        rows.pop()
    return rows


def _batches(encoded: list[list[int]], repeats: list[int], settings: BaseProfile, bos: int, eos: int,
             seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of packed rows. An epoch is every document `repeats[i]` times, shuffled by a generator
    seeded with (seed, epoch)."""
    pool = np.repeat(np.arange(len(encoded)), repeats)
    epoch = 0
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(pool)
        rows = pack(encoded, order, bos, eos, settings.seq_len)
        for start in range(0, len(rows) - settings.batch_size + 1, settings.batch_size):
            yield torch.stack(rows[start:start + settings.batch_size])
        epoch += 1


def _optimizer(model: torch.nn.Module, settings: BaseProfile) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices only (not on embeddings or norm gains)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if parameter.ndim >= 2 and "embed" not in name else no_decay).append(parameter)
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=settings.learning_rate, betas=(0.9, 0.95))


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, rows: list[torch.Tensor], batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over every predicted token of `rows` (rows may differ in length)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in chunk], batch_first=True)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").item()
        count += int((labels != -100).sum())
    return math.exp(total / count)


def _options_and_gold(sample: Sample) -> tuple[dict[str, str], str]:
    """The lettered options of a multiple-choice sample and its gold letter (the answer may be the letter or
    the option's text)."""
    name = sample.id
    turns = sample.conversations
    options = parse_options(turns[0]["value"])
    if turns[-1]["from"] != "gpt" or not options:
        raise MMComposeError(f"{name}: a multiple-choice sample needs lettered options and its answer as gpt turn")
    gold = turns[-1]["value"].strip()
    letters = {text: letter for letter, text in options.items()}
    if gold in options:
        return options, gold
    if gold in letters:
        return options, letters[gold]
    raise MMComposeError(f"{name}: the answer {gold!r} is neither an option letter nor an option's text")


@torch.no_grad()
def choice_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample],
                    template: str = "tagged", batch_size: int = 64) -> float:
    """Multiple-choice accuracy: the model picks the option whose text it finds most likely as the answer.

    The world's training data answers multiple choice with the option's text, so each option's text is
    scored by the summed log-probability of its tokens after the prompt. Scoring rather than parsing free
    text measures what the model knows, not how it phrases it; prompts are tokenized as the multimodal
    assembler does (`<s>` + prompt, then the answer).
    """
    model.eval()
    candidates: list[tuple[int, str, list[int], int]] = []  # (sample, letter, ids, prompt length)
    golds: list[str] = []
    for index, sample in enumerate(samples):
        options, gold = _options_and_gold(sample)
        golds.append(gold)
        prompt, _ = format_conversation(sample.conversations, template)
        prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        for letter, answer in options.items():
            answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            candidates.append((index, letter, prompt_ids + answer_ids, len(prompt_ids)))
    best: dict[int, tuple[float, str]] = {}
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start:start + batch_size]
        rows = [torch.tensor(ids) for _, _, ids, _ in chunk]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for row, (index, letter, sequence, prompt_length) in enumerate(chunk):
            positions = torch.arange(prompt_length - 1, len(sequence) - 1)
            score = logprobs[row, positions, ids[row, positions + 1]].sum().item()
            if index not in best or score > best[index][0]:
                best[index] = (score, letter)
    return sum(best[i][1] == gold for i, gold in enumerate(golds)) / len(golds)


def pretrain_base(corpus_train: Path, corpus_valid: Path, out: Path, *,
                  profile: Literal["small", "large"] = "small", seed: int = 0, text_qa: Path | None = None,
                  progress: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train the tokenizer and the LLM on `corpus_train`; evaluate; save both and `metrics.json` into `out`.

    AdamW with linear warm-up and cosine decay on packed rows. `out` appears complete or not at all. The
    returned (and saved) metrics hold held-out perplexity on `corpus_valid` and, given `text_qa`, the
    text-only multiple-choice accuracy.
    """
    if profile not in BASE_PROFILES:
        raise MMComposeError(f"unknown base profile {profile!r}; choose one of {', '.join(BASE_PROFILES)}")
    settings = BASE_PROFILES[profile]
    if Path(out).exists() and not overwrite:
        raise MMComposeError(f"{out} already exists (choose another path or pass --overwrite)")
    qa_samples = load_samples(text_qa).samples if text_qa is not None else []
    started = time.perf_counter()
    documents = read_documents(corpus_train)
    valid_documents = read_documents(corpus_valid)
    tokenizer = train_tokenizer(documents, settings.vocab_size)
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads, max_position_embeddings=1024, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = _optimizer(model, settings)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    dialogue = TEMPLATES["tagged"].user.strip()
    repeats = [1 if document.startswith(dialogue) else settings.prose_repeats for document in documents]
    batches = _batches(encoded, repeats, settings, bos, eos, seed)
    curve: list[float] = []
    window: list[float] = []
    model.train()
    with progress_bar(progress) as bar:
        task = bar.add_task(f"base LLM ({profile})", total=settings.steps, loss="-")
        for step in range(1, settings.steps + 1):
            rows = next(batches)
            loss = model(input_ids=rows, labels=rows).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(loss.item())
            if len(window) == 10 or step == settings.steps:
                curve.append(sum(window) / len(window))
                window = []
                bar.update(task, completed=step, loss=f"{curve[-1]:.3f}")
    train_seconds = time.perf_counter() - started

    valid_encoded = tokenizer(valid_documents, add_special_tokens=False)["input_ids"]
    valid_rows = pack(valid_encoded, range(len(valid_encoded)), bos, eos, settings.seq_len, keep_remainder=True)
    epoch_tokens = sum((len(ids) + 2) * times for ids, times in zip(encoded, repeats, strict=True))
    metrics: dict[str, Any] = {
        "profile": profile, "seed": seed, "settings": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "epoch_tokens": epoch_tokens,
        "epochs": round(settings.steps * settings.batch_size * settings.seq_len / epoch_tokens, 2),
        "train_loss": curve, "valid_perplexity": perplexity(model, valid_rows),
    }
    if qa_samples:
        metrics["text_qa_accuracy"] = choice_accuracy(model, tokenizer, qa_samples)
        metrics["text_qa_count"] = len(qa_samples)
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    with atomic_directory(out, overwrite=overwrite) as temporary:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        (temporary / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
