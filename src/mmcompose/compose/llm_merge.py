"""Merge full fine-tunes of one base LLM (plain transformers directories) into one LLM, mergekit-style.

The same operators and streaming as composition: for each tensor name, the base and every fine-tune are
read lazily, the deltas `W_ft - W_base` merged, and `W_base + merged` written straight to the output file,
so memory stays near one tensor per input whatever the model size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.progress import Progress

from mmcompose.compose.config import CompositionConfig
from mmcompose.compose.operators import OPERATORS
from mmcompose.errors import CompositionError
from mmcompose.files import atomic_directory
from mmcompose.tensorfiles import SafetensorsStream, TensorReader, weight_files

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model")


def merge_llms(base: str | Path, config: CompositionConfig, out: str | Path, *, overwrite: bool = False,
               progress: bool = True) -> Path:
    """`config.models` are fine-tunes of `base`; `config.merge` and its parameters say how to merge them."""
    base, out = Path(base), Path(out)
    if config.merge not in OPERATORS:
        raise CompositionError(f"merge {config.merge!r} needs LoRA inputs; full fine-tunes take "
                               f"{', '.join(sorted(OPERATORS))}")
    lambdas = [1.0 / len(config.models) if e.lambda_ is None else e.lambda_ for e in config.models]
    params = dict(config.parameters)
    if any(e.density is not None for e in config.models):
        params["density"] = [params.get("density") if e.density is None else e.density for e in config.models]
    readers = [TensorReader(weight_files(base))]
    try:
        readers += [TensorReader(weight_files(entry.path)) for entry in config.models]
        base_reader, tuned = readers[0], readers[1:]
        for entry, reader in zip(config.models, tuned, strict=True):
            if reader.layout != base_reader.layout:
                different = sorted(set(reader.layout.items()) ^ set(base_reader.layout.items()))[0][0]
                raise CompositionError(f"{entry.path} is not a fine-tune of {base}: tensor {different} differs "
                                       "in name, dtype or shape")
        generator = torch.Generator().manual_seed(config.seed)
        with atomic_directory(out, overwrite=overwrite) as temporary:
            with SafetensorsStream(temporary / "model.safetensors", base_reader.layout) as stream, \
                    Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task("merging", total=len(base_reader.layout))
                for name, (dtype, _) in base_reader.layout.items():
                    original = base_reader.get(name)
                    if original.is_floating_point():
                        base_value = original.float()
                        deltas = (reader.get(name).float() - base_value for reader in tuned)
                        if config.merge != "linear":  # linear accumulates a generator; the others need all
                            deltas = list(deltas)
                        merged = OPERATORS[config.merge](deltas, lambdas, params, generator)
                        stream.write(name, merged.add_(base_value).to(dtype))
                    else:
                        stream.write(name, original)
                    bar.advance(task)
            for file in COPIED_FILES:
                if (base / file).is_file():
                    shutil.copy2(base / file, temporary / file)
    finally:
        for reader in readers:
            reader.close()
    return out
