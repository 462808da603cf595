"""Checkpoints: a JSON manifest (base LLM by reference + fingerprint) and safetensors, validated strictly."""

from mmcompose.checkpoint.fingerprint import fingerprint_base
from mmcompose.checkpoint.manifest import FORMAT_VERSION, Manifest, read_manifest
from mmcompose.checkpoint.store import load_checkpoint, save_checkpoint

__all__ = ["FORMAT_VERSION", "Manifest", "fingerprint_base", "load_checkpoint", "read_manifest", "save_checkpoint"]
