"""Checkpoints from elsewhere in, standalone Hugging Face models out: official ModelCompose, llava-hf, PEFT."""

from mmcompose.importers.export import export_hf
from mmcompose.importers.llava_hf import import_llava_hf
from mmcompose.importers.modelcompose import EncoderSource, import_modelcompose
from mmcompose.importers.peft import import_peft

__all__ = ["EncoderSource", "export_hf", "import_llava_hf", "import_modelcompose", "import_peft"]
