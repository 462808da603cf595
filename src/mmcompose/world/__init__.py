"""The synthetic world: a seeded set of entities, their renderings in four modalities, a text corpus stating
their attributes, and the data sets (captions, instructions, single-modality tests, MCUB-3/4) built from them.
"""

from mmcompose.data.names import MCUB3_SUBSETS
from mmcompose.world.build import PROFILES, Profile, build_world, load_world
from mmcompose.world.entities import ATTRIBUTE_SCHEMA, MODALITIES, Entity, World, make_world
from mmcompose.world.render import (
    MEDIA_EXTENSIONS,
    render_audio,
    render_image,
    render_point,
    render_video,
    write_audio,
    write_image,
    write_point,
    write_video,
)
from mmcompose.world.templates import chat_document, chat_prompt

__all__ = [
    "ATTRIBUTE_SCHEMA",
    "MCUB3_SUBSETS",
    "MEDIA_EXTENSIONS",
    "MODALITIES",
    "PROFILES",
    "Entity",
    "Profile",
    "World",
    "build_world",
    "chat_document",
    "chat_prompt",
    "load_world",
    "make_world",
    "render_audio",
    "render_image",
    "render_point",
    "render_video",
    "write_audio",
    "write_image",
    "write_point",
    "write_video",
]
