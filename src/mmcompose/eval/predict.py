"""Bind a model to the evaluation runner: benchmark samples in, generated answers out, batched."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import torch

from mmcompose.eval.answers import Similarity
from mmcompose.eval.benchmark import Sample
from mmcompose.eval.runner import Predictor
from mmcompose.modalities import get_modality
from mmcompose.model import MultimodalLLM


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


def model_predictor(model: MultimodalLLM, max_new_tokens: int = 8, only: Sequence[str] | None = None) -> Predictor:
    """Greedy answers of `model`; with `only`, each sample is first restricted to those modalities."""
    def predict(samples: Sequence[Sample]) -> list[str]:
        examples = []
        for sample in samples:
            if only is not None:
                sample = restrict(sample, only)
            turns = [t for t in sample.conversations if t["from"] == "human"]
            examples.append(model.conversation_example(turns, sample.modal_inputs, id=sample.id))
        return model.generate(examples, max_new_tokens=max_new_tokens)

    return predict


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
