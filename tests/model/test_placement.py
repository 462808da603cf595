"""Placing and loading a model: device, dtype, accelerate device maps with disk offload, and every bad placement
or hostile manifest refused in one line before anything large is allocated."""

from __future__ import annotations

import json
import logging
import re
import resource
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from mmcompose.checkpoint import load_checkpoint
from mmcompose.cli import app
from mmcompose.errors import CheckpointError
from mmcompose.model import Example, MultimodalLLM, RoutedLinear
from mmcompose.model.placement import (
    PlacementError,
    parse_device_map,
    parse_max_memory,
    plan_placement,
    resolve_dtype,
)
from mmcompose.train.tokenizer import train_tokenizer
from tests.conftest import CORPUS, make_base
from tests.model.helpers import random_input, randomize_deltas, tiny_modality

PROMPT = "USER: <image> and <audio>: what is it? ASSISTANT:"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[MultimodalLLM, Path]:
    """A decoupled two-modality model with non-zero deltas and boundary tokens on a 3-layer LLaMA, saved."""
    root = tmp_path_factory.mktemp("placement")
    base = make_base(root / "base", layers=3)
    model = MultimodalLLM.from_base(base, [tiny_modality("image", boundary=2), tiny_modality("audio")],
                                    strategy="decoupled", rank=4, alpha=8.0)
    randomize_deltas(model, seed=3, scale=0.3)
    return model.eval(), model.save_pretrained(root / "ckpt")


def _example(seed: int = 0) -> Example:
    generator = torch.Generator().manual_seed(seed)
    return Example(prompt=PROMPT, inputs={"image": [random_input("image", generator)],
                                          "audio": [random_input("audio", generator)]})


def _logits(model: MultimodalLLM) -> torch.Tensor:
    with torch.no_grad():
        return model(model.assemble([_example(0), _example(1)], padding_side="left")).logits


OFFLOAD_MAP = {"llm.model.embed_tokens": "cpu", "llm.model.rotary_emb": "cpu", "llm.model.layers.0": "disk",
               "llm.model.layers.1": "cpu", "llm.model.layers.2": "disk", "llm.model.norm": "cpu",
               "llm.lm_head": "disk", "branches.image": "disk", "branches.audio": "cpu"}


def test_disk_offload_gives_the_in_memory_output(saved: tuple[MultimodalLLM, Path], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    model, path = saved
    with caplog.at_level(logging.WARNING, logger="accelerate.big_modeling"):
        offloaded = load_checkpoint(path, device_map=OFFLOAD_MAP, offload_folder=tmp_path / "offload").eval()
    # accelerate says once (not once for the base LLM and once for the whole model) that weights were offloaded
    notices = [r for r in caplog.records if r.getMessage().startswith("Some parameters are on the meta device")]
    assert len(notices) == 1
    # really offloaded: the disk layers' base weights, deltas and the image branch hold no memory
    params = dict(offloaded.named_parameters())
    for name in ("llm.model.layers.0.self_attn.q_proj.base.weight", "llm.model.layers.2.mlp.down_proj.deltas.image"
                 ".lora_B", "llm.lm_head.weight", "branches.image.connector.0.weight", "branches.image.prefix"):
        assert params[name].device.type == "meta", name
    assert params["llm.model.layers.1.self_attn.q_proj.deltas.language.lora_A"].device.type == "cpu"
    # each routed linear sees its route indices on the device its input is on (a cross-device plan would fail here
    # on a GPU split; on this CPU-only machine every device is the CPU, so this guards the wiring, not a GPU)
    seen: list[tuple[str, str]] = []

    def check_plan(module: RoutedLinear, args: tuple[torch.Tensor, ...]) -> None:
        plan = module._context.plan
        if plan is not None and plan.rows is not None:
            seen.append((str(plan.rows_on(args[0].device).device), str(args[0].device)))

    handles = [layer.register_forward_pre_hook(check_plan) for layer in offloaded.routed.values()]
    torch.testing.assert_close(_logits(offloaded), _logits(model), rtol=1e-5, atol=1e-5)
    for handle in handles:
        handle.remove()
    assert seen and all(index == data for index, data in seen)
    examples = [_example(0), _example(1)]
    assert offloaded.generate(examples, max_new_tokens=6) == model.generate(examples, max_new_tokens=6)
    # the offloaded layers are read in place from their safetensors files: nothing was copied to the folder
    assert not any((tmp_path / "offload").iterdir()) if (tmp_path / "offload").exists() else True
    hook = offloaded.llm.model.layers[0]._hf_hook
    source = hook.weights_map.dataset.index["llm.model.layers.0.self_attn.q_proj.base.weight"]
    assert source["weight_name"] == "model.layers.0.self_attn.q_proj.weight"
    assert Path(source["safetensors_file"]).parent == Path(model.base_path)
    # folding cannot last in weights the hooks reload: the model stays unfolded and exact
    offloaded.fold_text_route()
    assert not offloaded.routing.folded
    assert offloaded.generate(examples, max_new_tokens=6) == model.generate(examples, max_new_tokens=6)


def test_auto_map_with_a_cpu_budget_spills_to_disk_and_stays_exact(saved: tuple[MultimodalLLM, Path],
                                                                   tmp_path: Path) -> None:
    model, path = saved
    budget = f"cpu={sum(t.numel() * t.element_size() for t in model.state_dict().values()) // 2}"
    with pytest.raises(PlacementError, match=r"^--max-memory: .* GiB of the model would go to the disk; pass "
                                             r"--offload-folder"):
        load_checkpoint(path, device_map="auto", max_memory=budget)
    spilled = load_checkpoint(path, device_map="sequential", max_memory=budget, offload_folder=tmp_path / "o")
    assert "disk" in set(spilled.hf_device_map.values()) and "cpu" in set(spilled.hf_device_map.values())
    assert all(not key.startswith("llm.model.layers.0.") for key in spilled.hf_device_map)  # layers kept whole
    torch.testing.assert_close(_logits(spilled), _logits(model), rtol=1e-5, atol=1e-5)


def test_bfloat16_load_puts_everything_in_bfloat16(saved: tuple[MultimodalLLM, Path]) -> None:
    model, path = saved
    half = load_checkpoint(path, dtype="bfloat16")
    assert {t.dtype for t in half.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    torch.testing.assert_close(_logits(half).float(), _logits(model), atol=0.15, rtol=0.05)
    same = load_checkpoint(path, dtype=torch.bfloat16, device="cpu")
    assert torch.equal(_logits(same), _logits(half))


def test_auto_dtype_is_the_stored_one_except_float16_on_the_cpu(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    assert resolve_dtype("auto", torch.device("cpu"), base) == torch.float32
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    assert resolve_dtype("auto", torch.device("cpu"), base) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cuda", 0), base) == torch.float16
    assert resolve_dtype("float32", torch.device("cpu"), base) == torch.float32


def _hostile(path: Path, tmp_path: Path, change) -> Path:
    """A copy of the checkpoint whose manifest `change` rewrites (the tensor file is untouched)."""
    copy = tmp_path / "hostile"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["base"]["path"] = str((path / manifest["base"]["path"]).resolve())
    change(manifest["model"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(("field", "change", "message"), [
    ("rank", lambda spec: spec["deltas"][0].update(rank=200_000_000),
     r"model\.deltas\[0\] \(language, kind lora, rank 200000000\)"),
    ("prefix", lambda spec: spec["modalities"][0].update(num_prefix_tokens=1_000_000_000),
     r"model\.modalities\[0\] \(image\)\.num_prefix_tokens 1000000000"),
    ("width", lambda spec: spec["modalities"][1]["encoder"]["options"].update(width=1_000_000),
     r"model\.modalities\[1\] \(audio\)\.encoder \(audio-frame\)"),
])
def test_hostile_manifest_is_refused_before_any_allocation(saved: tuple[MultimodalLLM, Path], tmp_path: Path,
                                                           field: str, change, message: str) -> None:
    _, path = saved
    hostile = _hostile(path, tmp_path, change)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=rf"^{hostile}/model\.safetensors: tensor \S+ has shape .*{message}"):
        load_checkpoint(hostile)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100, f"{field}: peak RSS grew {grown_mib:.0f} MiB while refusing"


def test_checkpoint_tensors_in_another_float_dtype_are_cast_on_load(saved: tuple[MultimodalLLM, Path],
                                                                    tmp_path: Path) -> None:
    _, path = saved
    copy = tmp_path / "half"
    copy.mkdir()
    (copy / "manifest.json").write_text(_absolute_manifest(path))
    with safe_open(path / "model.safetensors", "pt") as handle:
        tensors = {name: handle.get_tensor(name).to(torch.bfloat16) for name in handle.keys()}  # noqa: SIM118
    save_file(tensors, copy / "model.safetensors")
    loaded = load_checkpoint(copy)
    assert {t.dtype for t in loaded.checkpoint_tensors().values()} == {torch.float32}
    name = "modalities.image.prefix"
    assert torch.equal(loaded.checkpoint_tensors()[name], tensors[name].float())


def _absolute_manifest(path: Path) -> str:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["base"]["path"] = str((path / manifest["base"]["path"]).resolve())
    return json.dumps(manifest)


@pytest.fixture
def no_base_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the base LLM starts loading: placement errors must come before anything large."""
    def refuse(*args, **kwargs):
        raise AssertionError("the base LLM was loaded before the placement was checked")

    monkeypatch.setattr("mmcompose.model.mllm.load_base", refuse)


@pytest.mark.usefixtures("no_base_load")
@pytest.mark.parametrize(("options", "message"), [
    (dict(device="cuda"), r"^--device cuda: no CUDA GPU is visible"),
    (dict(device="cuda:3"), r"^--device cuda:3: no CUDA GPU is visible"),
    (dict(device="tpu"), r"^--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (dict(dtype="float8"), r"^--dtype 'float8': expected auto, bfloat16, float16, float32"),
    (dict(dtype="float16"), r"^--dtype float16 on the CPU: float16 matmuls are emulated"),
    (dict(device_map={"llm.model.layers.9": "cpu", "": "cpu"}), r"^--device-map: 'llm\.model\.layers\.9' is not a "
                                                                  r"module of the model"),
    (dict(device_map={"llm": "cpu"}), r"^--device-map: does not cover branches\.image"),
    (dict(device_map={"llm": "cpu", "branches": "cpu", "llm.model.layers.1.mlp": "disk"}),
     r"^--device-map: 'llm\.model\.layers\.1\.mlp' splits llm\.model\.layers\.1 \(LlamaDecoderLayer\)"),
    (dict(device_map={"": 0}), r"^--device-map: '' -> 0: no such GPU \(0 visible\)"),
    (dict(device_map={"": "disk"}), r"^--device-map: .* GiB of the model would go to the disk; pass --offload"),
    (dict(device_map="everywhere"), r"^--device-map 'everywhere': expected auto, balanced"),
    (dict(device_map="{not json"), r"^--device-map: invalid JSON"),
    (dict(device_map="auto", max_memory="cpu=1KiB"), r"^--max-memory: .* would go to the disk"),
    (dict(device_map="auto", max_memory="cpu=lots"), r"^--max-memory: size 'lots' of cpu"),
    (dict(device_map="auto", max_memory="2=1GiB"), r"^--max-memory: GPU 2 is not visible"),
    (dict(max_memory="cpu=1GiB"), r"^--max-memory goes with --device-map"),
    (dict(device="cpu", device_map="auto"), r"^--device cpu and --device-map: give one"),
])
def test_bad_placement_is_one_line_naming_the_flag(saved: tuple[MultimodalLLM, Path], options: dict,
                                                   message: str) -> None:
    _, path = saved
    with pytest.raises(PlacementError, match=message) as error:
        load_checkpoint(path, **options)
    assert "\n" not in str(error.value)


def test_device_map_and_max_memory_parsing(tmp_path: Path) -> None:
    assert parse_max_memory("cpu=2GiB") == {"cpu": 2 * 1024**3}
    assert parse_max_memory(" cpu = 500MB ,") == {"cpu": 500 * 10**6}
    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"llm": "cpu", "branches": "disk"}))
    assert parse_device_map(str(mapping)) == {"llm": "cpu", "branches": "disk"}


def test_cli_placement_errors_are_one_line(saved: tuple[MultimodalLLM, Path]) -> None:
    _, path = saved
    runner = CliRunner()
    for flags, expected in ((["--device", "cuda"], "--device cuda: no CUDA GPU"),
                            (["--dtype", "half"], "--dtype 'half'"),
                            (["--device-map", "auto", "--max-memory", "cpu=1KiB"], "--max-memory:")):
        result = runner.invoke(app, ["chat", "--model", str(path), *flags, "hello"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], result.output


def test_loading_initialises_nothing_the_checkpoint_overwrites(saved: tuple[MultimodalLLM, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = saved
    initialised: list[tuple[int, ...]] = []
    for name in ("kaiming_uniform_", "normal_", "uniform_", "zeros_", "ones_", "trunc_normal_", "xavier_uniform_"):
        original = getattr(torch.nn.init, name)

        def record(tensor: torch.Tensor, *args, _original=original, **kwargs) -> torch.Tensor:
            if tensor.device.type != "meta":
                initialised.append(tuple(tensor.shape))
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, record)
    load_checkpoint(path)
    assert initialised == []


def test_from_base_takes_device_and_dtype(saved: tuple[MultimodalLLM, Path]) -> None:
    model, _ = saved
    half = MultimodalLLM.from_base(model.base_path, [tiny_modality("image", boundary=1)], strategy="decoupled",
                                   rank=2, alpha=4.0, device="cpu", dtype="bfloat16")
    assert {t.dtype for t in half.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    trainable = MultimodalLLM.from_base(model.base_path, [tiny_modality("image")], strategy="shared")
    assert {p.dtype for p in trainable.branches.parameters()} == {torch.float32}
    with pytest.raises(PlacementError, match=r"^--device cuda: no CUDA GPU"):
        MultimodalLLM.from_base(model.base_path, ["image"], device="cuda")


def test_tied_embeddings_offloaded_to_disk(tmp_path: Path) -> None:
    """A base whose output layer shares the input embedding: the shared weight is read from the one name the base
    stores it under."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=320)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = MultimodalLLM.from_base(tmp_path / "base", [tiny_modality("image")], strategy="decoupled", rank=4,
                                    alpha=8.0)
    randomize_deltas(model, seed=1, scale=0.2)
    model.save_pretrained(tmp_path / "ckpt")
    mapping = {"llm.model.embed_tokens": "disk", "llm.lm_head": "disk", "llm.model.layers.0": "disk",
               "llm.model.layers.1": "cpu", "llm.model.norm": "cpu", "llm.model.rotary_emb": "cpu", "branches": "cpu"}
    offloaded = load_checkpoint(tmp_path / "ckpt", device_map=mapping, offload_folder=tmp_path / "offload").eval()
    example = Example(prompt="USER: <image> ok?", inputs={"image": [random_input("image", torch.Generator())]})
    with torch.no_grad():
        torch.testing.assert_close(offloaded(offloaded.assemble([example])).logits,
                                   model.eval()(model.assemble([example])).logits, rtol=1e-5, atol=1e-5)
    assert offloaded.generate([example], 5) == model.generate([example], 5)


def test_chat_runs_with_a_disk_offload_map(saved: tuple[MultimodalLLM, Path], tmp_path: Path) -> None:
    _, path = saved
    arguments = ["chat", "--model", str(path), "--max-new-tokens", "5", "what is a blorvin?"]
    in_memory = CliRunner().invoke(app, arguments)
    offloaded = CliRunner().invoke(app, [*arguments, "--device-map", json.dumps(OFFLOAD_MAP),
                                         "--offload-folder", str(tmp_path / "offload")])
    assert in_memory.exit_code == 0 and offloaded.exit_code == 0, (in_memory.output, offloaded.output)
    assert offloaded.output == in_memory.output and in_memory.output.strip()


def test_a_parent_entry_covers_what_inner_keys_leave(saved: tuple[MultimodalLLM, Path], tmp_path: Path) -> None:
    model, path = saved
    offloaded = load_checkpoint(path, device_map={"": "cpu", "llm.model.layers.1": "disk", "branches.audio": "disk"},
                                offload_folder=tmp_path / "offload")
    assert offloaded.llm.model.layers[1].mlp.up_proj.base.weight.device.type == "meta"
    assert offloaded.llm.model.layers[0].mlp.up_proj.base.weight.device.type == "cpu"
    torch.testing.assert_close(_logits(offloaded), _logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_a_plan_over_two_gpus_keeps_layers_and_branches_whole(saved: tuple[MultimodalLLM, Path], strategy: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning only (two GPUs are pretended; nothing is allocated): layers spread over both GPUs, then the CPU,
    never split, with inputs starting on GPU 0."""
    model, _ = saved
    skeleton = MultimodalLLM.skeleton(model.base_path, model.spec, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    placement = plan_placement(skeleton, device="auto", dtype=torch.bfloat16, device_map=strategy,
                               max_memory="0=80KiB,1=80KiB,cpu=1GiB", offload_folder=None,
                               no_split=skeleton.no_split_modules())
    places = placement.device_map
    assert placement.device == torch.device("cuda", 0) and {0, 1, "cpu"} <= set(places.values())
    assert "disk" not in places.values()
    for key in places:
        assert not re.fullmatch(r"llm\.model\.layers\.\d+\..+|branches\.\w+\..+", key), key
    for layer in range(3):
        assert placement.device_of(f"llm.model.layers.{layer}.self_attn.q_proj.deltas.image.lora_A") == \
            placement.device_of(f"llm.model.layers.{layer}.self_attn.q_proj.base.weight")
