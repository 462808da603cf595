"""Video-LLaVA import, both layouts: the imported image + video model computes what the source model computes."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcompose.checkpoint import load_checkpoint
from mmcompose.errors import CheckpointError
from mmcompose.importers import import_video_llava
from mmcompose.model import Example, MultimodalLLM
from tests.conftest import make_base
from tests.importers.fixtures import (
    NUM_FRAMES,
    NUM_PATCHES,
    make_languagebind_image,
    make_languagebind_video,
    make_video_llava,
    make_video_llava_hf,
)

BEFORE, BETWEEN, AFTER = "USER: ", " and ", "\nwhat happens? ASSISTANT:"
PROMPT = BEFORE + "<image>" + BETWEEN + "<video>" + AFTER


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 16, 16, generator=generator), torch.randn(NUM_FRAMES, 3, 16, 16, generator=generator)


def ours(model: MultimodalLLM, image: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(model.assemble([Example(prompt=PROMPT, inputs={"image": [image],
                                                                           "video": [video]})])).logits


def pieces(tokenizer, image_ids: list[int], video_ids: list[int]) -> list[int]:
    """The ids of PROMPT with the placeholders replaced by `image_ids` / `video_ids`, tokenized piece by piece."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    return [tokenizer.bos_token_id, *encode(BEFORE), *image_ids, *encode(BETWEEN), *video_ids, *encode(AFTER)]


def hf_logits(source: torch.nn.Module, model: MultimodalLLM, image: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    vocab = model.llm.config.vocab_size
    config = source.config
    ids = pieces(model.tokenizer, [config.image_token_id] * NUM_PATCHES,
                 [config.video_token_id] * NUM_FRAMES * (NUM_PATCHES + 1))
    with torch.no_grad():
        return source(input_ids=torch.tensor([ids]), pixel_values_images=image[None],
                      pixel_values_videos=video[None]).logits[..., :vocab]


@pytest.fixture(scope="module")
def video_llava_hf(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("video-llava-hf")
    return directory, make_video_llava_hf(directory, llama_base)


def test_hf_layout_dense_reproduces_video_llava(video_llava_hf, llama_base: Path, tmp_path: Path) -> None:
    directory, source = video_llava_hf
    model = load_checkpoint(import_video_llava(directory, tmp_path / "vl", base=llama_base))
    image, video = inputs()
    got, expected = ours(model, image, video), hf_logits(source, model, image, video)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-5
    spec = {m.name: m for m in model.spec.modalities}
    assert (spec["image"].placeholder, spec["video"].placeholder) == ("<image>", "<video>")
    assert spec["image"].processor.options["size"] == 16 and spec["video"].processor.options["num_frames"] == NUM_FRAMES
    assert [(d.name, d.kind, d.routes) for d in model.spec.deltas] == [("full", "dense", ["text", "image", "video"])]
    image_connector = model.branches["image"].connector.state_dict()
    assert all(torch.equal(v, model.branches["video"].connector.state_dict()[k]) for k, v in image_connector.items())
    notes = " | ".join(model.provenance["notes"])
    assert "dropped 4 vocabulary row(s)" in notes and "temporal attention is absent" in notes
    assert model.provenance["imported_from"] == "video-llava-hf"


def test_hf_layout_svd_reports_its_error(video_llava_hf, llama_base: Path, tmp_path: Path) -> None:
    directory, source = video_llava_hf
    model = load_checkpoint(import_video_llava(directory, tmp_path / "vl", base=llama_base, svd_rank=3))
    error = model.provenance["svd_relative_error"]
    assert 0.1 < error < 1 and model.spec.deltas[0].rank == 3
    image, video = inputs()
    assert float((ours(model, image, video) - hf_logits(source, model, image, video)).abs().max()) > 1e-3


def test_newer_key_layout_imports_the_same(video_llava_hf, llama_base: Path, tmp_path: Path) -> None:
    directory, _ = video_llava_hf
    renamed = tmp_path / "hub"
    renamed.mkdir()
    shutil.copy(directory / "config.json", renamed / "config.json")
    layout = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
              "image_tower.": "model.image_tower.vision_model.", "video_tower.": "model.video_tower.vision_model.",
              "multi_modal_projector.": "model.multi_modal_projector."}
    tensors = {}
    for name, value in load_file(directory / "model.safetensors").items():
        old = next(prefix for prefix in layout if name.startswith(prefix))
        tensors[layout[old] + name.removeprefix(old)] = value
    save_file(tensors, renamed / "model.safetensors")
    first = load_file(import_video_llava(directory, tmp_path / "a", base=llama_base) / "model.safetensors")
    second = load_file(import_video_llava(renamed, tmp_path / "b", base=llama_base) / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def original(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("video-llava")
    image_tower = make_languagebind_image(root / "LanguageBind_Image")
    video_tower = make_languagebind_video(root / "LanguageBind_Video_merge")
    llm, projector = make_video_llava(root / "Video-LLaVA-7B", llama_base)
    return dict(root=root, src=root / "Video-LLaVA-7B", llm=llm, projector=projector, image_tower=image_tower,
                video_tower=video_tower, encoders={"image": root / "LanguageBind_Image",
                                                   "video": root / "LanguageBind_Video_merge"})


def original_logits(parts: dict, model: MultimodalLLM, image: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """The original Video-LLaVA's forward: tower features (image: layer -2 without CLS; video: layer -2, every
    token of every frame) through the shared projector, spliced into the fine-tuned LLaMA's input embeddings."""
    llm, projector = parts["llm"], parts["projector"]
    with torch.no_grad():
        hidden = parts["image_tower"](image[None], output_hidden_states=True).hidden_states
        image_features = projector(hidden[-2][:, 1:])
        video_features = projector(parts["video_tower"](video[None]))
        encode = lambda text: llm.get_input_embeddings()(  # noqa: E731
            torch.tensor([model.tokenizer(text, add_special_tokens=False).input_ids]))
        bos = llm.get_input_embeddings()(torch.tensor([[model.tokenizer.bos_token_id]]))
        embeds = torch.cat([bos, encode(BEFORE), image_features, encode(BETWEEN), video_features, encode(AFTER)], 1)
        return llm(inputs_embeds=embeds).logits[..., : model.llm.config.vocab_size]


def test_original_layout_reproduces_video_llava(original, llama_base: Path, tmp_path: Path) -> None:
    out = import_video_llava(original["src"], tmp_path / "vl", base=llama_base, encoders=original["encoders"])
    model = load_checkpoint(out)
    image, video = inputs(1)
    got = ours(model, image, video)
    assert got.shape[1] == len(pieces(model.tokenizer, [0] * NUM_PATCHES, [0] * NUM_FRAMES * (NUM_PATCHES + 1)))
    assert float((got - original_logits(original, model, image, video)).abs().max()) < 1e-5
    spec = {m.name: m for m in model.spec.modalities}
    assert (spec["image"].encoder.type, spec["video"].encoder.type) == ("clip-vision", "languagebind-video")
    assert spec["image"].processor.options["pad_to_square"] is True
    assert model.provenance["imported_from"] == "video-llava" and model.spec.template == "vicuna_v1"
    assert any("dropped 1 vocabulary row(s)" in note for note in model.provenance["notes"])


def test_original_layout_with_its_towers_saved_checks_them(original, llama_base: Path, tmp_path: Path) -> None:
    towers = {"image": copy.deepcopy(original["image_tower"]).half(), "video": original["video_tower"]}
    make_video_llava(tmp_path / "with-towers", llama_base, towers=towers)  # a float16 image tower: equal, rounded
    import_video_llava(tmp_path / "with-towers", tmp_path / "ok", base=llama_base, encoders=original["encoders"])
    other = make_languagebind_image(tmp_path / "other-image", seed=99)
    make_video_llava(tmp_path / "other", llama_base, towers={"image": other})
    with pytest.raises(CheckpointError, match=r"its image tower \(model.image_tower.image_tower.vision_model.*\) "
                                              r"differs from the one given"):
        import_video_llava(tmp_path / "other", tmp_path / "out", base=llama_base, encoders=original["encoders"])
    assert not (tmp_path / "out").exists()


def _edited(source: Path, target: Path, **changes: object) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        (config[section] if field else config)[field or section] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(("changes", "message"), [
    ({"vision_config__hidden_size": 32}, "image_tower.* has shape|has shape"),
    ({"text_config__vocab_size": 400}, r"has shape \(324, 32\) \(vocabulary 400: the base LLM's has \(320, 32\)\)"),
    ({"video_token_index": 5}, "video_token_id 5 is not one of the rows the checkpoint appended"),
    ({"video_seq_length": 100}, "video_seq_length 100 is not a whole number of frames of 17 tokens"),
])
def test_hf_layout_disagreeing_with_its_config_is_one_line(video_llava_hf, llama_base: Path, tmp_path: Path,
                                                           changes: dict, message: str) -> None:
    directory, _ = video_llava_hf
    broken = _edited(directory, tmp_path / "broken", **changes)
    with pytest.raises(CheckpointError, match=message) as raised:
        import_video_llava(broken, tmp_path / "out", base=llama_base)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_original_layout_bad_input_is_one_line(original, llama_base: Path, tmp_path: Path) -> None:
    src, encoders = original["src"], original["encoders"]
    with pytest.raises(CheckpointError, match=r"does not contain its towers; supply --encoder image=PATH "
                                              r"\(LanguageBind/LanguageBind_Image\) and --encoder video=PATH"):
        import_video_llava(src, tmp_path / "out", base=llama_base)
    wider = _edited(src, tmp_path / "wider", mm_hidden_size=32)
    with pytest.raises(CheckpointError, match="image encoder given outputs width 24, but the checkpoint's "
                                              "mm_hidden_size is 32"):
        import_video_llava(wider, tmp_path / "out", base=llama_base, encoders=encoders)
    with pytest.raises(CheckpointError, match=r"LanguageBind_Image: a LanguageBind image tower .* serves image, "
                                              "not video"):
        import_video_llava(src, tmp_path / "out", base=llama_base,
                           encoders={"image": encoders["image"], "video": encoders["image"]})
    same_shape = make_base(tmp_path / "same-shape", seed=1)  # another base of vicuna's shape: its weights tell
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from the base LLM's; only the target"):
        import_video_llava(src, tmp_path / "out", base=same_shape, encoders=encoders)
    other_base = make_base(tmp_path / "other-base", hidden=48)
    with pytest.raises(CheckpointError, match="its LLM has hidden_size=32, the base LLM has hidden_size=48"):
        import_video_llava(src, tmp_path / "out", base=other_base, encoders=encoders)
    assert not (tmp_path / "out").exists()
