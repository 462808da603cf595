"""Six released models into one, end to end on CPU: tiny random instances with the exact key layouts of the four
ModelCompose releases (image, audio, video, point), llava-1.5-hf and Video-LLaVA (original layout and -hf), all
on one tiny vicuna-shaped base with its tokenizer -> `mmcompose import ...` -> one DAMC composition of all of them
(the image and video models of LLaVA and Video-LLaVA renamed) -> every modality route checked against its
source -> one prompt with every input answered -> export.

A route's check runs a sequence made only of that modality's tokens (its branch output, every position on its
route), so it exercises exactly what DAMC promises to keep: the branch and the modality's own delta at full
strength. Against the imported model it must match to float32 rounding (1e-5) for every source; for the two
llava-hf-family sources it is also compared with the released transformers model itself, where an SVD import
differs by its truncation: its reported relative error is checked weight by weight (overall and worst layer),
and its logits must stay nearer the release's than the untuned base's are.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mmcompose.checkpoint import load_checkpoint
from mmcompose.cli import app
from mmcompose.modalities.point_bert import PointBERTEncoder
from mmcompose.model import MultimodalLLM
from tests.importers.fixtures import (
    NUM_FRAMES,
    NUM_PATCHES,
    make_clip,
    make_languagebind_image,
    make_languagebind_video,
    make_llava,
    make_modelcompose,
    make_video_llava,
    make_video_llava_hf,
)
from tests.importers.test_released_system import FIXTURES, RELEASED, _media
from tests.modalities.tiny import POINT_BERT

runner = CliRunner()
# imported model -> {its modality: name in the composition}
RENAMES = {"llava-1.5-hf": {"image": "image-llava"},
           "video-llava": {"image": "image-vl", "video": "video-vl"},
           "video-llava-hf": {"image": "image-vlhf", "video": "video-vlhf"}}
SVD_RANKS = {"llava-1.5-hf": 12, "video-llava-hf": 12}  # of 32: a random fine-tune keeps ~half its change


def run(*args: object) -> str:
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def route_logits(model: MultimodalLLM, modality: str, processed: torch.Tensor) -> torch.Tensor:
    """Logits of a sequence made of one `modality` input only, every position on that modality's route."""
    with torch.no_grad():
        embeds = model.branches[modality](processed[None])
        with model.routing.route(torch.full(embeds.shape[:2], model.spec.route_ids()[modality])):
            return model.llm(inputs_embeds=embeds).logits


def import_all(base: Path, root: Path) -> dict[str, Path]:
    """The six releases in their own layouts, imported with the commands the README gives for the real ones."""
    imported: dict[str, Path] = {}
    encoders = {"image": make_clip(root / "clip"), "audio": FIXTURES / "beats_audio_encoder",
                "video": FIXTURES / "languagebind_video_tower", "point": root / "point-bert.json"}
    torch.manual_seed(0)
    torch.save(PointBERTEncoder(**POINT_BERT).state_dict(), root / "point_bert.pt")
    encoders["point"].write_text(json.dumps({"type": "point-bert", "options": POINT_BERT, "weights": "point_bert.pt"}))
    for seed, (modality, (strategy, projector, width)) in enumerate(RELEASED.items()):
        make_modelcompose(root / "official" / modality, base, strategy, widths={modality: width},
                          projectors={modality: projector}, seed=seed)
        imported[modality] = root / "imported" / modality
        run("import", "modelcompose", root / "official" / modality, "-o", imported[modality], "--base", base,
            "--encoder", f"{modality}={encoders[modality]}")
    make_llava(root / "llava-1.5-7b-hf", base)
    imported["llava-1.5-hf"] = root / "imported" / "llava-1.5-hf"
    run("import", "llava-hf", root / "llava-1.5-7b-hf", "-o", imported["llava-1.5-hf"], "--base", base,
        "--svd-rank", SVD_RANKS["llava-1.5-hf"], "--template", "vicuna_v1")
    make_languagebind_image(root / "LanguageBind_Image")
    make_languagebind_video(root / "LanguageBind_Video_merge")
    make_video_llava(root / "Video-LLaVA-7B", base)
    imported["video-llava"] = root / "imported" / "video-llava"
    run("import", "video-llava", root / "Video-LLaVA-7B", "-o", imported["video-llava"], "--base", base,
        "--encoder", f"image={root / 'LanguageBind_Image'}", "--encoder", f"video={root / 'LanguageBind_Video_merge'}")
    make_video_llava_hf(root / "Video-LLaVA-7B-hf", base)
    imported["video-llava-hf"] = root / "imported" / "video-llava-hf"
    run("import", "video-llava", root / "Video-LLaVA-7B-hf", "-o", imported["video-llava-hf"], "--base", base,
        "--svd-rank", SVD_RANKS["video-llava-hf"])
    return imported


def svd_weight_errors(model: MultimodalLLM, release: Path, base: Path, route: str) -> tuple[float, float]:
    """(overall, worst layer) relative Frobenius error of the route's LLM change against the release's change,
    measured from the weight files: ||D_route - D_release|| / ||D_release||."""
    release_weights = load_file(release / "model.safetensors")
    base_weights = {k: v for file in sorted(base.glob("*.safetensors")) for k, v in load_file(file).items()}
    delta = next(d.name for d in model.spec.deltas if route in d.routes)
    lost = total = worst = 0.0
    for path, layer in model.routed.items():
        wanted = release_weights[f"language_model.{path}.weight"].float() - base_weights[f"{path}.weight"].float()
        error = float((layer.deltas[delta].matrix().detach().float() - wanted).pow(2).sum())
        energy = float(wanted.pow(2).sum())
        lost, total, worst = lost + error, total + energy, max(worst, math.sqrt(error / energy))
    return math.sqrt(lost / total), worst


def test_six_released_models_import_compose_route_by_route_answer_and_export(llama_base: Path,
                                                                             tmp_path: Path) -> None:
    """One prompt with all nine inputs is ~600 positions: the base is the tiny one with vicuna's long context."""
    llama_base = Path(shutil.copytree(llama_base, tmp_path / "vicuna-tiny"))
    config = json.loads((llama_base / "config.json").read_text())
    (llama_base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    imported = import_all(llama_base, tmp_path)
    config = tmp_path / "compose.yaml"
    config.write_text(yaml.safe_dump({"method": "damc", "models": [
        {"path": str(path), **({"rename": RENAMES[name]} if name in RENAMES else {})}
        for name, path in imported.items()]}))
    composed_dir = tmp_path / "composed"
    run("compose", config, "-o", composed_dir)
    composed = load_checkpoint(composed_dir).eval()
    names = [m.name for m in composed.spec.modalities]
    assert names == ["image", "audio", "video", "point", "image-llava", "image-vl", "video-vl", "image-vlhf",
                     "video-vlhf"]
    assert {m.name: m.placeholder for m in composed.spec.modalities}["image-llava"] == "<image-llava>"
    routes = {d.name: d.routes for d in composed.spec.deltas}
    assert routes["image-vl"] == ["image-vl", "video-vl"] and "video-vl" not in routes  # one LLM change, one delta

    media = {k: tmp_path / v for k, v in _media(tmp_path / "media").items()}
    files = {"image": media["vision"], "audio": media["audio"], "video": media["video"], "point": media["point"]}
    differences: dict[str, float] = {}
    for name, path in imported.items():
        source = load_checkpoint(path).eval()
        for modality in source.spec.modalities:
            new = RENAMES.get(name, {}).get(modality.name, modality.name)
            processed = composed.processors[new](files[modality.name])
            torch.testing.assert_close(processed, source.processors[modality.name](files[modality.name]))
            differences[new] = float((route_logits(composed, new, processed)
                                      - route_logits(source, modality.name, processed)).abs().max())
    assert max(differences.values()) <= 1e-5, differences

    # Against the released transformers models themselves: llava-1.5-hf on an all-<image> sequence, Video-LLaVA-hf
    # on an all-<video> one. The SVD truncation is the only difference; its reported error is the weights' own.
    llava = make_llava(tmp_path / "again-llava", llama_base)  # same seed: the release imported above
    video_llava = make_video_llava_hf(tmp_path / "again-vl", llama_base)
    vocab = composed.llm.config.vocab_size
    plain = AutoModelForCausalLM.from_pretrained(llama_base).eval()
    pixels = composed.processors["image-llava"](files["image"])
    frames = composed.processors["video-vlhf"](files["video"])
    with torch.no_grad():
        release = {
            "image-llava": llava(input_ids=torch.full((1, NUM_PATCHES), vocab), pixel_values=pixels[None]).logits,
            "video-vlhf": video_llava(input_ids=torch.full((1, NUM_FRAMES * (NUM_PATCHES + 1)), vocab + 1),
                                      pixel_values_videos=frames[None]).logits,
        }
    for (name, release_dir), route in zip((("llava-1.5-hf", "llava-1.5-7b-hf"),
                                           ("video-llava-hf", "Video-LLaVA-7B-hf")), release, strict=True):
        provenance = load_checkpoint(imported[name]).provenance
        overall, worst = svd_weight_errors(composed, tmp_path / release_dir, llama_base, route)
        assert math.isclose(overall, provenance["svd_relative_error"], rel_tol=1e-3)
        assert math.isclose(worst, provenance["svd_max_layer_relative_error"], rel_tol=1e-3)
        processed = pixels if route == "image-llava" else frames
        with torch.no_grad():
            untuned = plain(inputs_embeds=composed.branches[route](processed[None])).logits
        expected = release[route][..., :vocab]
        gap = float((route_logits(composed, route, processed) - expected).norm())
        assert 0 < gap < float((untuned - expected).norm())  # nearer the release than the base is

    prompt = ("USER: " + " ".join(m.placeholder for m in composed.spec.modalities)
              + "\nWhat do these have in common? ASSISTANT:")
    inputs = {m.name: [files[m.name.split("-")[0]]] for m in composed.spec.modalities}
    (answer,) = composed.generate([composed.example(prompt, inputs)], max_new_tokens=4)
    assert isinstance(answer, str)

    run("compose", "--from", composed_dir, "--remove", "image-vl+video-vl", "-o", tmp_path / "without")
    without = load_checkpoint(tmp_path / "without")
    assert "video-vl" not in [m.name for m in without.spec.modalities]
    assert "image-vl" not in {d.name for d in without.spec.deltas}

    run("export", composed_dir, "--hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "mmcompose" / "manifest.json").is_file()
    result = runner.invoke(app, ["export", str(composed_dir), "--llava-hf", str(tmp_path / "llava-hf")])
    assert result.exit_code == 2 and "it has 9 modalities" in result.output and not (tmp_path / "llava-hf").exists()
    run("export", imported["llava-1.5-hf"], "--llava-hf", tmp_path / "llava-out")
    assert (tmp_path / "llava-out" / "config.json").is_file()
