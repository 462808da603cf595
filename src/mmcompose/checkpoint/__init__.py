"""Checkpoints: a JSON manifest (base LLM by reference + fingerprint) and safetensors, validated strictly.

The public face of the checkpoint format. The format itself is `mmcompose.model.manifest` and the tensor
files `mmcompose.tensorfiles`, below the model, so that `MultimodalLLM.save_pretrained` /
`from_pretrained` need nothing above it; `save_checkpoint` and `load_checkpoint` are those two methods.
"""

from mmcompose.model.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TENSOR_FILE,
    BaseReference,
    Manifest,
    base_reference,
    read_manifest,
    resolve_base,
    write_checkpoint,
    write_manifest,
)
from mmcompose.model.mllm import MultimodalLLM
from mmcompose.tensorfiles import check_tensor_set, checkpoint_files, fingerprint_base, read_tensors

save_checkpoint = MultimodalLLM.save_pretrained
load_checkpoint = MultimodalLLM.from_pretrained

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TENSOR_FILE",
    "BaseReference",
    "Manifest",
    "base_reference",
    "check_tensor_set",
    "checkpoint_files",
    "fingerprint_base",
    "load_checkpoint",
    "read_manifest",
    "read_tensors",
    "resolve_base",
    "save_checkpoint",
    "write_checkpoint",
    "write_manifest",
]
