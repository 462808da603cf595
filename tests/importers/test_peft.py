"""PEFT LoRA import: the imported delta computes what PEFT computes, rank/alpha patterns included."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.errors import CheckpointError
from mmcompose.importers import import_peft
from mmcompose.model import Example, MultimodalLLM
from tests.model.helpers import randomize_deltas, tiny_modality

PROMPT = "USER: which habitat? ASSISTANT: The zeppa lives in the forest."


def make_adapter(base: Path, directory: Path, **options) -> torch.nn.Module:
    torch.manual_seed(5)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(lora_dropout=0.0, **options)).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    peft_model.save_pretrained(directory)
    return peft_model


def text_logits(model: MultimodalLLM) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(model.assemble([Example(prompt=PROMPT)])).logits


def peft_logits(model: MultimodalLLM, peft_model: torch.nn.Module) -> torch.Tensor:
    ids = [model.tokenizer.bos_token_id, *model.tokenizer(PROMPT, add_special_tokens=False).input_ids]
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("options", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
         alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_rslora=True),
])
def test_imported_adapter_equals_peft(llama_base: Path, tmp_path: Path, options: dict) -> None:
    peft_model = make_adapter(llama_base, tmp_path / "adapter", **options)
    out = import_peft(tmp_path / "adapter", tmp_path / "ours", base=llama_base, modality="image")
    model = load_checkpoint(out)
    assert [(d.name, d.routes) for d in model.spec.deltas] == [("shared", ["text", "image"])]
    assert model.spec.target_modules == options["target_modules"]
    torch.testing.assert_close(text_logits(model), peft_logits(model, peft_model), rtol=0, atol=1e-5)
    uniform = "rank_pattern" not in options
    assert model.spec.deltas[0].rank == 4 and any("padded" in n for n in model.provenance["notes"]) != uniform


def test_language_route_keeps_the_checkpoints_modality_delta(llama_base: Path, tmp_path: Path) -> None:
    trained = MultimodalLLM.from_base(llama_base, [tiny_modality("image", boundary=1), tiny_modality("audio")],
                                      strategy="decoupled", rank=2, alpha=4.0, target_modules=["q_proj", "up_proj"])
    randomize_deltas(trained, seed=4)
    checkpoint = save_checkpoint(trained, tmp_path / "trained")
    peft_model = make_adapter(llama_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = import_peft(tmp_path / "adapter", tmp_path / "ours", base=llama_base, modality="image",
                      from_checkpoint=checkpoint, route="language")
    model = load_checkpoint(out)
    assert [m.name for m in model.spec.modalities] == ["image"]
    assert [(d.name, d.routes) for d in model.spec.deltas] == [("image", ["image"]), ("language", ["text"])]
    assert model.spec.target_modules == ["q_proj", "v_proj", "up_proj"]
    torch.testing.assert_close(text_logits(model), peft_logits(model, peft_model), rtol=0, atol=1e-5)
    ours, theirs = model.checkpoint_tensors(), trained.checkpoint_tensors()
    for name, value in theirs.items():
        if name.startswith(("modalities.image.", "deltas.image.")):
            assert torch.equal(ours[name], value), name
    assert not ours["deltas.image.model.layers.0.self_attn.v_proj.lora_B"].any()  # zero where it had no weights


def test_unsupported_or_foreign_adapters_are_refused(llama_base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    make_adapter(llama_base, adapter, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora is not supported: DoRA"):
        import_peft(adapter, tmp_path / "out", base=llama_base, modality="image")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors = {name.replace("layers.1.", "layers.9."): value for name, value in tensors.items()}
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"the adapter targets model\.layers\.9\.self_attn\.q_proj, which the "
                                              r"base LLM does not have"):
        import_peft(adapter, tmp_path / "out", base=llama_base, modality="image")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "use_dora is not supported: DoRA adds a magnitude vector"),
        ({"bias": "lora_only"}, "bias is not supported: trained biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save is not supported: modules_to_save trains whole modules"),
        ({"use_qalora": True}, "use_qalora is not supported: use_qalora=True changes what the adapter computes"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported: it changes the base weights"),
        ({"a_future_option": 3}, "sets a_future_option, unknown to PEFT"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported (only LORA)"),
        ({"layers_pattern": "layers"}, "adapter_config.json: When `layers_pattern` is specified"),  # PEFT's own check
        ({"r": 0}, "r must be a positive number"),
    ],
)
def test_adapter_configs_are_parsed_by_peft_and_refused_in_one_line(llama_base: Path, tmp_path: Path, change: dict,
                                                                    message: str) -> None:
    adapter = tmp_path / "adapter"
    make_adapter(llama_base, adapter, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=re.escape(message)) as error:
        import_peft(adapter, tmp_path / "out", base=llama_base, modality="image")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_options_at_their_default_or_off_are_accepted(llama_base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    make_adapter(llama_base, adapter, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    off = {"use_dora": False, "bias": "none", "modules_to_save": None, "a_future_option": None,
           "init_lora_weights": "gaussian", "lora_dropout": 0.1}
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **off}))
    assert import_peft(adapter, tmp_path / "out", base=llama_base, modality="image").is_dir()
