"""Modality plug-ins and the four built-ins: image, audio, video, point."""

from mmcompose.modalities.beats import BEATsEncoder, BeatsFbankProcessor
from mmcompose.modalities.clap import CLAPAudioEncoder
from mmcompose.modalities.clip import CLIPPixelProcessor, CLIPVisionEncoder
from mmcompose.modalities.connectors import LinearConnector, MLPConnector, ResamplerConnector
from mmcompose.modalities.encoders import AudioFrameEncoder, ImagePatchEncoder, PointGroupEncoder, VideoFrameEncoder
from mmcompose.modalities.languagebind import LanguageBindVideoEncoder, LanguageBindVideoProcessor
from mmcompose.modalities.point_bert import PointBERTEncoder
from mmcompose.modalities.processors import AudioProcessor, ImageProcessor, PointProcessor, VideoProcessor
from mmcompose.modalities.qformer import QFormerConnector
from mmcompose.modalities.registry import (
    CONNECTORS,
    ENCODERS,
    MODALITIES,
    PROCESSORS,
    Modality,
    Processor,
    build_connector,
    build_encoder,
    build_processor,
    get_modality,
    register_connector,
    register_encoder,
    register_modality,
    register_processor,
)
from mmcompose.modalities.whisper import WhisperAudioEncoder

register_encoder("image-patch", ImagePatchEncoder)
register_encoder("audio-frame", AudioFrameEncoder)
register_encoder("video-frame", VideoFrameEncoder)
register_encoder("point-group", PointGroupEncoder)
register_encoder("clip-vision", CLIPVisionEncoder)
register_encoder("whisper-audio", WhisperAudioEncoder)
register_encoder("clap-audio", CLAPAudioEncoder)
register_encoder("point-bert", PointBERTEncoder)
register_encoder("beats", BEATsEncoder)
register_encoder("languagebind-video", LanguageBindVideoEncoder)
register_connector("linear", LinearConnector)
register_connector("mlp2x_gelu", MLPConnector)
register_connector("resampler", ResamplerConnector)
register_connector("qformer", QFormerConnector)
register_processor("image", ImageProcessor)
register_processor("audio", AudioProcessor)
register_processor("video", VideoProcessor)
register_processor("point", PointProcessor)
register_processor("clip-image", CLIPPixelProcessor)
register_processor("beats-fbank", BeatsFbankProcessor)
register_processor("languagebind-video", LanguageBindVideoProcessor)

register_modality(Modality("image", "<image>", processor="image", encoder="image-patch"))
register_modality(Modality("audio", "<audio>", processor="audio", encoder="audio-frame"))
register_modality(Modality("video", "<video>", processor="video", encoder="video-frame"))
register_modality(Modality("point", "<point>", processor="point", encoder="point-group"))

__all__ = [
    "CONNECTORS",
    "ENCODERS",
    "MODALITIES",
    "PROCESSORS",
    "Modality",
    "Processor",
    "build_connector",
    "build_encoder",
    "build_processor",
    "get_modality",
    "register_connector",
    "register_encoder",
    "register_modality",
    "register_processor",
]
