"""Bind a model to the evaluation runner: benchmark samples in, generated answers out, batched.

A model's predictor works in the runner's two stages: `prepare` formats a sample's text and decodes its media
(it holds only the template and the modality processors, so it pickles into DataLoader workers without the
model), and `answer` generates for a batch of prepared examples, with the text route folded when that pays.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from mmcompose.errors import MMComposeError
from mmcompose.eval.answers import Similarity
from mmcompose.eval.benchmark import Sample
from mmcompose.eval.fold_cost import folding_pays
from mmcompose.modalities import get_modality
from mmcompose.model import Example, MultimodalLLM
from mmcompose.model.assembly import pad_rows
from mmcompose.model.conversation import format_conversation
from mmcompose.model.mllm import process_inputs
from mmcompose.model.routed import TEXT_ROUTE


def restrict(sample: Sample, keep: Sequence[str]) -> Sample:
    """The sample with only the inputs of `keep`: other placeholders (and their lines, if alone) are removed.

    This is how a single-modality model is asked an MCUB question: it sees only its own input.
    """
    human = sample.conversations[0]["value"]
    for modality in sample.modal_inputs:
        if modality not in keep:
            placeholder = get_modality(modality).placeholder
            human = re.sub(rf"^{re.escape(placeholder)}\n", "", human, flags=re.MULTILINE)
            human = human.replace(placeholder, "")
    conversations = [{**sample.conversations[0], "value": human}, *sample.conversations[1:]]
    inputs = {m: paths for m, paths in sample.modal_inputs.items() if m in keep}
    return replace(sample, conversations=conversations, modal_inputs=inputs)


class Preparation:
    """Sample -> the model's `Example`: the human turns in the model's template, the media decoded and processed.

    It holds the template, the tokenizer (a `chat` template renders with it) and the processors, never the model,
    so DataLoader workers receive it pickled (or forked) at the cost of those few objects."""

    def __init__(self, model: MultimodalLLM, only: Sequence[str] | None = None) -> None:
        self.processors = dict(model.processors)
        self.format = partial(format_conversation, template=model.spec.template, tokenizer=model.tokenizer,
                              chat_template=model.spec.chat_template)
        self.only = None if only is None else tuple(only)

    def sample(self, sample: Sample) -> Sample:
        """The sample as the model sees it: restricted to `only` if given."""
        return sample if self.only is None else restrict(sample, self.only)

    def prompt(self, sample: Sample) -> str:
        return self.format([t for t in sample.conversations if t["from"] == "human"])[0]

    def __call__(self, sample: Sample) -> Example:
        sample = self.sample(sample)
        return Example(prompt=self.prompt(sample), inputs=process_inputs(self.processors, sample.modal_inputs,
                                                                         sample.id), id=sample.id)


class ModelPredictor:
    """Greedy answers of `model`; with `only`, each sample is first restricted to those modalities.

    Called on samples it prepares and answers them in one go (the runner's serial path and other callers). The
    runner instead runs `prepare` in DataLoader workers, orders the samples by `sort_keys` so that a batch
    holds sequences of similar length, and wraps the run in `evaluating`, which folds the text route when that
    pays (`fold`: None decides on the run's first batch, see `folding_pays`; True or False forces it).
    """

    def __init__(self, model: MultimodalLLM, max_new_tokens: int = 8, only: Sequence[str] | None = None,
                 fold: bool | None = None) -> None:
        self.model, self.max_new_tokens, self.fold = model, max_new_tokens, fold
        self.prepare = Preparation(model, only)
        self._deciding = False
        self._input_positions: dict[str, int] = {}

    def __call__(self, samples: Sequence[Sample]) -> list[str]:
        return self.answer([self.prepare(sample) for sample in samples])

    def answer(self, examples: Sequence[Example]) -> list[str]:
        if self._deciding:
            self._deciding = False
            if self.folding_pays(examples):
                self.model.fold_text_route()
        return self.model.generate(list(examples), max_new_tokens=self.max_new_tokens)

    def sort_keys(self, samples: Sequence[Sample]) -> list[tuple[Any, ...]]:
        """Keys that put samples of one length next to each other, without decoding any medium: the number of
        inputs of each modality (which fixes the positions they take), then the prompt's text tokens; longest
        first, so a batch too large for the device fails at the start of a run, not at its end. A sample whose
        text cannot be formatted sorts last (preparing it records the error)."""
        counts, prompts = [], []
        for sample in samples:
            sample = self.prepare.sample(sample)
            counts.append(tuple(-len(sample.modal_inputs.get(m, ())) for m in self.model.processors))
            try:
                prompts.append(self.prepare.prompt(sample))
            except MMComposeError:
                prompts.append(None)
        texts = [Example(prompt=prompt) for prompt in prompts if prompt is not None]
        lengths = iter(self.model.assembler.sequence_lengths(texts, {m: 0 for m in self.model.processors}))
        return [(1,) if prompt is None else (0, *count, -next(lengths))
                for count, prompt in zip(counts, prompts, strict=True)]

    def folding_pays(self, examples: Sequence[Example]) -> bool:
        """Whether folding the text route makes `examples` cheaper to answer, by the deterministic estimate of
        `mmcompose.eval.fold_cost` (never a timing, so that the answers do not depend on the machine's load).

        Folding removes `D_text` from every text position and every decode step, but every position of a modality
        with its own delta then applies `D_m` and `-D_text`. Measured (benchmarks/fold_decision.py): at the demo's
        widths folding is faster for 32-token answers and within noise for one-letter ones (per-op overhead
        weighs as much as the FLOPs, and an unfolded batch gathers and scatters every position); at vicuna-7b's
        widths in bfloat16 on a CPU a media-heavy MCUB-4 item (~3,200 modality positions) pays only for answers
        of thousands of tokens, a text-heavy chat prompt for a few hundred (within noise at 16 and 512). Without
        a text delta there is nothing to fold (False); when every modality shares the text's delta (NaiveMC's
        single delta) folding leaves nothing to correct and always pays.
        """
        route_to_delta = self.model.routing.route_to_delta
        if route_to_delta.get(TEXT_ROUTE) is None:
            return False
        return folding_pays(list(self.model.routed.values()), route_to_delta, self._routes(examples),
                            self.max_new_tokens)

    def _routes(self, examples: Sequence[Example]) -> torch.Tensor:
        """The batch's routes `(rows, positions)`, left-padded with text as `generate` assembles them, from the
        prompts and the positions one input of each modality takes (no medium is encoded twice). An example the
        assembler would refuse counts as no positions: answering it fails on its own."""
        lengths = {name: self._positions(name, inputs[0]) for example in examples
                   for name, inputs in example.inputs.items() if inputs and name in self.model.processors}
        rows = []
        for example in examples:
            try:
                rows.append(self.model.assembler.layout(example, lengths)[1])
            except MMComposeError:
                rows.append([])
        return pad_rows(rows, TEXT_ROUTE, "left")

    def _positions(self, modality: str, processed: torch.Tensor) -> int:
        if modality not in self._input_positions:
            self._input_positions[modality] = self.model.input_length(modality, processed)
        return self._input_positions[modality]

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Fold the model's text route for the run if `fold` says so (None: if `folding_pays` on the first
        batch), and unfold it after, so a model object reused afterwards is unchanged. A model folded before
        stays folded."""
        if self.model.routing.folded or self.fold is False:
            yield
            return
        if self.fold:
            self.model.fold_text_route()
        self._deciding = self.fold is None
        try:
            yield
        finally:
            self._deciding = False
            self.model.unfold_text_route()


def model_predictor(model: MultimodalLLM, max_new_tokens: int = 8, only: Sequence[str] | None = None,
                    fold: bool | None = None) -> ModelPredictor:
    """Greedy answers of `model`; with `only`, each sample is first restricted to those modalities."""
    return ModelPredictor(model, max_new_tokens, only, fold)


def embedding_similarity(model: MultimodalLLM) -> Similarity:
    """A local judge for closed-set answers: cosine between the mean input embeddings of the prediction and
    of each label, using the model's own token embeddings (no remote LLM, nothing downloaded)."""
    table = model.llm.get_input_embeddings().weight.detach()

    def embed(text: str) -> torch.Tensor:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"] or [model.tokenizer.unk_token_id or 0]
        return table[torch.tensor(ids, device=table.device)].float().mean(0)

    def similarity(prediction: str, labels: Sequence[str]) -> list[float]:
        reference = embed(prediction)
        return [float(torch.cosine_similarity(reference, embed(label), dim=0)) for label in labels]

    return similarity
