"""Official ModelCompose import: the imported model computes the official forward, and every malformed
checkpoint is refused with a clear message.

The reference is independent of our model code: a stock transformers LLaMA reading an embedding sequence
built the official way (`[prefix | projector(encoder(x)) | suffix]` per modality span), with each target
linear's LoRA applied per token as the official LocalLoraLinear does it (`same`: PEFT with the `default`
adapter on every token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, CLIPVisionModel

from mmcompose.checkpoint import load_checkpoint
from mmcompose.errors import CheckpointError
from mmcompose.importers import import_modelcompose
from mmcompose.model import Component, Example, MultimodalLLM
from mmcompose.model.routed import DEFAULT_TARGET_MODULES, RoutedLinear
from tests.importers.fixtures import linear_shapes, make_clip, make_modelcompose
from tests.model.helpers import TINY_ENCODERS, random_input

RANK, ALPHA = 4, 8
WIDTHS = {"image": 24, "audio": 16}
PIECES = ["USER: ", "<image>", " and ", "<audio>", "\nwhat do they share? ASSISTANT:"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip"))


def encoders(clip: Path) -> dict[str, object]:
    return {"image": clip, "audio": TINY_ENCODERS["audio"]}


def official_sequence(model: MultimodalLLM, llm: torch.nn.Module, state: dict[str, torch.Tensor], clip: Path,
                      inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """Embeddings and per-position adapter names, assembled as the official code does, from the raw tensors.
    Only the audio encoder (a user-supplied component, not under test) is taken from our model."""
    tokenizer, embed = model.tokenizer, llm.get_input_embeddings()
    with torch.no_grad():
        image = CLIPVisionModel.from_pretrained(clip)(inputs["image"][None], output_hidden_states=True)
        projector = "model.modal_projectors."
        hidden = F.gelu(F.linear(image.hidden_states[-2][:, 1:], state[f"{projector}vision.0.weight"],
                                 state[f"{projector}vision.0.bias"]))
        vision = F.linear(hidden, state[f"{projector}vision.2.weight"], state[f"{projector}vision.2.bias"])
        audio = F.linear(model.branches["audio"].encoder(inputs["audio"][None]),
                         state[f"{projector}audio.weight"], state[f"{projector}audio.bias"])
        features = {"vision": vision[0], "audio": audio[0]}
        parts, names = [embed(torch.tensor([tokenizer.bos_token_id]))], ["default"]
        for piece in PIECES:
            official = {"<image>": "vision", "<audio>": "audio"}.get(piece)
            if official is None:
                parts.append(embed(torch.tensor(tokenizer(piece, add_special_tokens=False).input_ids)))
                names += ["default"] * parts[-1].shape[0]
            else:
                parts.append(torch.cat([state[f"prefix_tokens.{official}"][0], features[official],
                                        state[f"suffix_tokens.{official}"][0]]))
                names += [official] * parts[-1].shape[0]
    return torch.cat(parts)[None], names


def official_logits(base: Path, model: MultimodalLLM, state: dict[str, torch.Tensor], strategy: str, clip: Path,
                    inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    llm = AutoModelForCausalLM.from_pretrained(base).eval()
    if strategy == "same":  # one adapter on every token: exactly PEFT, whose key names the official file shares
        llm = get_peft_model(llm, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=list(DEFAULT_TARGET_MODULES)))
        with torch.no_grad():
            for name, parameter in llm.named_parameters():
                if "lora_" in name:
                    parameter.copy_(state[name.removeprefix("base_model.model.")])
        embeds, _ = official_sequence(model, llm, state, clip, inputs)
        with torch.no_grad():
            return llm(inputs_embeds=embeds).logits
    embeds, names = official_sequence(model, llm, state, clip, inputs)
    adapters = sorted({key.split(".lora_A.")[1].removesuffix(".weight") for key in state if ".lora_A." in key})

    def local_lora(path: str):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
            for adapter in adapters:
                mask = torch.tensor([name == adapter for name in names], dtype=output.dtype)[None, :, None]
                update = F.linear(F.linear(args[0], state[f"{path}.lora_A.{adapter}.weight"]),
                                  state[f"{path}.lora_B.{adapter}.weight"]) * (ALPHA / RANK)
                output = output + mask * update
            return output
        return hook

    for path in linear_shapes(base):
        llm.get_submodule(path).register_forward_hook(local_lora(path))
    with torch.no_grad():
        return llm(inputs_embeds=embeds).logits


@pytest.mark.parametrize(("strategy", "prefix", "deltas"), [
    ("same", "base_model.model.", {"shared": ["text", "image", "audio"]}),
    ("modal+language", "", {"language": ["text"], "image": ["image"], "audio": ["audio"]}),
    ("modal", "", {"image": ["image"], "audio": ["audio"]}),
])
def test_imported_model_computes_the_official_forward(llama_base: Path, clip: Path, tmp_path: Path, strategy: str,
                                                      prefix: str, deltas: dict[str, list[str]]) -> None:
    saved = make_modelcompose(tmp_path / "official", llama_base, strategy, widths=WIDTHS, rank=RANK, alpha=ALPHA,
                              prefix=prefix)
    state = {name.removeprefix(prefix): value for name, value in saved.items()}
    out = import_modelcompose(tmp_path / "official", tmp_path / "ours", base=llama_base, encoders=encoders(clip))
    model = load_checkpoint(out).eval()
    assert {d.name: d.routes for d in model.spec.deltas} == deltas
    assert model.spec.template == "vicuna_v1" and model.provenance["ignored"] == ["prefix_tokens.default",
                                                                                  "suffix_tokens.default"]
    generator = torch.Generator().manual_seed(1)
    inputs = {"image": torch.randn(3, 16, 16, generator=generator), "audio": random_input("audio", generator)}
    batch = model.assemble([Example(prompt="".join(PIECES), inputs={m: [x] for m, x in inputs.items()})])

    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layer = model.llm.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(layer, RoutedLinear)
    handle = layer.register_forward_hook(lambda m, args, output: captured.update(io=(args[0], output)))
    with torch.no_grad():
        got = model(batch).logits
    handle.remove()
    expected = official_logits(llama_base, model, state, strategy, clip, inputs)
    assert (expected - AutoModelForCausalLM.from_pretrained(llama_base)(inputs_embeds=batch.embeds).logits
            ).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # Per layer, per token: y = W x + (alpha / r) B_m A_m x with m the token's adapter.
    x, y = captured["io"]
    path = "model.layers.1.mlp.down_proj"
    adapter_of = {0: "default", 1: "vision", 2: "audio"}
    for position, route in enumerate(batch.routes[0].tolist()):
        adapter = "default" if strategy == "same" else adapter_of[route]
        want = F.linear(x[0, position], layer.base.weight)
        if f"{path}.lora_A.{adapter}.weight" in state:
            want = want + (ALPHA / RANK) * state[f"{path}.lora_B.{adapter}.weight"] @ (
                state[f"{path}.lora_A.{adapter}.weight"] @ x[0, position])
        torch.testing.assert_close(y[0, position], want, rtol=0, atol=1e-5)


def test_encoders_are_required_and_must_fit(llama_base: Path, clip: Path, tmp_path: Path) -> None:
    make_modelcompose(tmp_path / "official", llama_base, "modal+language", widths=WIDTHS)
    with pytest.raises(CheckpointError, match=r"does not contain its frozen encoders; supply: image \(mm_vision_tower="
                                              r"/official/vision-encoder, width 24\); audio .* --encoder image=PATH"):
        import_modelcompose(tmp_path / "official", tmp_path / "out", base=llama_base)
    wide = Component(type="audio-frame", options={**TINY_ENCODERS["audio"].options, "width": 32})
    with pytest.raises(CheckpointError, match="audio encoder given outputs width 32, but the checkpoint's "
                                              "mm_audio_hidden_size is 16"):
        import_modelcompose(tmp_path / "official", tmp_path / "out", base=llama_base,
                            encoders={"image": clip, "audio": wide})
    component = tmp_path / "audio.json"
    component.write_text(json.dumps(TINY_ENCODERS["audio"].model_dump()))
    out = import_modelcompose(tmp_path / "official", tmp_path / "out", base=llama_base,
                              encoders={"image": clip, "audio": component})
    reused = import_modelcompose(tmp_path / "official", tmp_path / "again", base=llama_base,
                                 encoders={"image": clip, "audio": out})  # an mmcompose checkpoint's encoder
    assert load_checkpoint(reused).provenance["encoders"]["audio"].startswith("audio-frame from checkpoint")


def _rewrite(directory: Path, change) -> None:
    state = torch.load(directory / "adapter_model.bin", weights_only=True)
    change(state)
    torch.save(state, directory / "adapter_model.bin")


def test_unknown_and_missing_keys_are_refused(llama_base: Path, clip: Path, tmp_path: Path) -> None:
    official = tmp_path / "official"
    make_modelcompose(official, llama_base, "modal+language", widths=WIDTHS)
    _rewrite(official, lambda state: state.update({"model.layers.0.input_layernorm.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"1 unknown key\(s\): model\.layers\.0\.input_layernorm\.weight"):
        import_modelcompose(official, tmp_path / "out", base=llama_base, encoders=encoders(clip))
    _rewrite(official, lambda state: [state.pop("model.layers.0.input_layernorm.weight"),
                                      state.pop("model.layers.1.self_attn.k_proj.lora_B.audio.weight"),
                                      state.pop("suffix_tokens.vision")])
    with pytest.raises(CheckpointError, match=r"2 expected key\(s\) missing: model\.layers\.1\.self_attn\.k_proj\."
                                              r"lora_B\.audio\.weight, suffix_tokens\.vision"):
        import_modelcompose(official, tmp_path / "out", base=llama_base, encoders=encoders(clip))
    assert not (tmp_path / "out").exists()


class Payload:
    """Unpickling this would create a file: a stand-in for code a malicious pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickle_with_objects_is_refused_without_running_it(llama_base: Path, clip: Path, tmp_path: Path) -> None:
    official = tmp_path / "official"
    make_modelcompose(official, llama_base, "same", widths=WIDTHS)
    marker = tmp_path / "ran"
    _rewrite(official, lambda state: state.update({"extra": Payload(marker)}))
    with pytest.raises(CheckpointError, match="refused: the pickle holds objects other than tensors, and mmcompose "
                                              "only unpickles with weights_only=True"):
        import_modelcompose(official, tmp_path / "out", base=llama_base, encoders=encoders(clip))
    assert not marker.exists()


def test_the_official_qformer_connector_is_imported(llama_base: Path, clip: Path, tmp_path: Path) -> None:
    official = tmp_path / "official"
    saved = make_modelcompose(official, llama_base, "modal+language", widths=WIDTHS,
                              projectors={"image": "mlp2x_gelu", "audio": "qformer_4N_2L"})
    model = load_checkpoint(import_modelcompose(official, tmp_path / "out", base=llama_base,
                                                encoders=encoders(clip))).eval()
    spec = next(m for m in model.spec.modalities if m.name == "audio")
    assert spec.connector.type == "qformer" and spec.connector.options == dict(
        num_queries=4, num_layers=2, width=48, num_heads=12, intermediate_size=24, num_positions=1024)
    connector = model.branches["audio"].connector
    prefix = "model.modal_projectors.audio."
    # the official names, spelled out: every tensor lands where the module that computes it reads it
    assert torch.equal(connector.query_tokens, saved[prefix + "audio_query_tokens"])
    assert torch.equal(connector.position_embedding.weight, saved[prefix + "audio_position_embedding.weight"])
    assert torch.equal(connector.query_norm.bias, saved[prefix + "audio_Qformer.bert.embeddings.LayerNorm.bias"])
    assert torch.equal(connector.layers[1].crossattention.self["value"].weight,
                       saved[prefix + "audio_Qformer.bert.encoder.layer.1.crossattention.self.value.weight"])
    assert torch.equal(connector.layers[0].output_query["LayerNorm"].weight,
                       saved[prefix + "audio_Qformer.bert.encoder.layer.0.output_query.LayerNorm.weight"])
    assert torch.equal(connector.proj.weight, saved[prefix + "audio_llama_proj.weight"])
    with torch.no_grad():
        tokens = connector(torch.randn(2, 7, WIDTHS["audio"]))
    assert tokens.shape == (2, 4, model.llm.config.hidden_size)


def test_an_unknown_projector_type_names_the_file_and_key(llama_base: Path, clip: Path, tmp_path: Path) -> None:
    official = tmp_path / "official"
    make_modelcompose(official, llama_base, "modal+language", widths=WIDTHS)
    config = json.loads((official / "config.json").read_text())
    config["mm_audio_projector_type"] = "perceiver_9x"
    (official / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"official/config\.json: mm_audio_projector_type: unknown projector "
                                              r"type 'perceiver_9x' \(importable: linear, mlp2x_gelu, "
                                              r"qformer_<N>N_<L>L\)$"):
        import_modelcompose(official, tmp_path / "out", base=llama_base, encoders=encoders(clip))
    assert not (tmp_path / "out").exists()
    config["mm_audio_projector_type"] = "linear"  # Q-Former keys under a linear projector are not silently dropped
    (official / "config.json").write_text(json.dumps(config))
    _rewrite(official, lambda state: state.update({"model.modal_projectors.audio.audio_query_tokens": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"1 unknown key\(s\): model\.modal_projectors\.audio\.audio_query"):
        import_modelcompose(official, tmp_path / "out", base=llama_base, encoders=encoders(clip))


def test_per_modality_boundary_counts_are_honoured(llama_base: Path, clip: Path, tmp_path: Path) -> None:
    official = tmp_path / "official"
    make_modelcompose(official, llama_base, "modal+language", widths=WIDTHS, boundary=2)
    config = json.loads((official / "config.json").read_text())
    config.update(local_audio_prefix_tokens=1, local_audio_suffix_tokens=0)
    (official / "config.json").write_text(json.dumps(config))
    hidden = config["hidden_size"]
    _rewrite(official, lambda state: state.update({"prefix_tokens.audio": state["prefix_tokens.audio"][:, :1],
                                                   "suffix_tokens.audio": torch.zeros(1, 0, hidden)}))
    model = load_checkpoint(import_modelcompose(official, tmp_path / "out", base=llama_base,
                                                encoders=encoders(clip)))
    counts = {m.name: (m.num_prefix_tokens, m.num_suffix_tokens) for m in model.spec.modalities}
    assert counts == {"image": (2, 2), "audio": (1, 0)}
