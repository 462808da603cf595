"""mmcompose: build one multimodal LLM out of single-modality MLLMs that share a base LLM."""

import logging
import os

import torch

from mmcompose.errors import CheckpointError, CompositionError, InputError, MMComposeError

__version__ = "0.1.0"

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # transformers imports DeepSpeed whenever it is installed, and DeepSpeed's accelerator probe then logs a
    # warning on every machine without a GPU ("Setting accelerator to CPU ..."), into every command's output.
    # Naming the CPU accelerator it would pick anyway keeps the probe quiet; a user's own DS_ACCELERATOR wins.
    os.environ["DS_ACCELERATOR"] = "cpu"

# bitsandbytes' CPU backend, when imported on an AVX512-BF16 CPU (peft and transformers import it whenever it is
# installed, e.g. by `mmcompose[quantize]`), tries to fetch an optional 4-bit kernel from a model hub and, when it
# cannot, logs a warning into every command's output advising `pip install kernels`; it then uses its built-in
# kernel, which `mmcompose.model.quantize` probes before any quantized load. Errors from that module still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["CheckpointError", "CompositionError", "InputError", "MMComposeError", "__version__"]
