"""mmcompose: build one multimodal LLM out of single-modality MLLMs that share a base LLM."""

from mmcompose.errors import CheckpointError, CompositionError, InputError, MMComposeError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "CompositionError", "InputError", "MMComposeError", "__version__"]
