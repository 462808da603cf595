"""Checkpoints from elsewhere in, standalone models out: official ModelCompose, llava-hf, Video-LLaVA, LLaVA's
LoRA release, PEFT; export as a Hugging Face LLM plus our modality files, or as a llava-hf LLaVA."""

from mmcompose.importers.export import export_hf
from mmcompose.importers.llava_hf import import_llava_hf
from mmcompose.importers.llava_lora import import_llava_lora
from mmcompose.importers.modelcompose import EncoderSource, import_modelcompose
from mmcompose.importers.peft import import_peft
from mmcompose.importers.video_llava import import_video_llava

__all__ = ["EncoderSource", "export_hf", "import_llava_hf", "import_llava_lora", "import_modelcompose", "import_peft",
           "import_video_llava"]
