"""The tool-learning alternative to composition: each single-modality model captions its own input, then the
text-only base LLM answers the question with the captions in place of the media.

The world's captions read "This is a <name>."; the pipeline passes the LLM the named entity (what a
captioning tool reports), falling back to the whole caption when it does not follow that form.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from mmcompose.eval.benchmark import Sample
from mmcompose.eval.predict import model_predictor
from mmcompose.eval.runner import Predictor
from mmcompose.model import MultimodalLLM

CAPTION_QUESTION = "What is this?"
CAPTION_PATTERN = re.compile(r"^\s*This is an? (\w+)\.?\s*$")


def caption_name(caption: str) -> str:
    match = CAPTION_PATTERN.match(caption)
    return match.group(1) if match else caption.strip()


def tool_predictor(captioners: dict[str, MultimodalLLM], language_model: MultimodalLLM,
                   max_new_tokens: int = 8) -> Predictor:
    """`captioners[m]` describes inputs of modality m; `language_model` (no modalities) answers from text."""
    answer = model_predictor(language_model, max_new_tokens)

    def predict(samples: Sequence[Sample]) -> list[str]:
        texts = [s.conversations[0]["value"] for s in samples]
        for modality, captioner in captioners.items():
            placeholder = next(m.placeholder for m in captioner.spec.modalities if m.name == modality)
            requests = [(i, path) for i, s in enumerate(samples) for path in s.modal_inputs.get(modality, [])]
            if not requests:
                continue
            turn = [{"from": "human", "value": f"{placeholder}\n{CAPTION_QUESTION}"}]
            examples = [captioner.conversation_example(turn, {modality: [p]}, id=samples[i].id) for i, p in requests]
            captions = captioner.generate(examples, max_new_tokens=max_new_tokens)
            for (i, _), caption in zip(requests, captions, strict=True):
                texts[i] = texts[i].replace(placeholder, caption_name(caption), 1)
        described = [replace(s, conversations=[{"from": "human", "value": t}], modal_inputs={})
                     for s, t in zip(samples, texts, strict=True)]
        return answer(described)

    return predict
