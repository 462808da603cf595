"""The `mmcompose` command line. Every user-facing failure is one line on stderr and exit code 2."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mmcompose.errors import MMComposeError

# rich_markup_mode=None: click's own help layout. Rich's options table cuts long option names to fit the
# terminal (`--mixed-precis…` at 80 columns); click's moves the description to the next line instead.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Compose single-modality multimodal LLMs that share a base LLM into one model, and measure it.")
console, errors = Console(), Console(stderr=True)


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into `error: <message>` and exit code 2 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MMComposeError as error:
            errors.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def main() -> None:
    """Compose single-modality multimodal LLMs that share a base LLM into one model, and measure it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own progress and messages are enough on a terminal
    hf_logging.disable_progress_bar()


@app.command()
@one_line_errors
def show(checkpoint: Annotated[Path, typer.Argument(help="An mmcompose checkpoint directory.")]) -> None:
    """Print what a checkpoint holds: base LLM, modalities, deltas and provenance (reads only the manifest)."""
    from mmcompose.checkpoint import read_manifest

    manifest = read_manifest(checkpoint)
    spec = manifest.model
    console.print(f"[bold]{checkpoint}[/bold]  strategy={spec.strategy}  template={spec.template}")
    console.print(f"base: {manifest.base.path}  ({manifest.base.fingerprint[:23]}...)")
    table = Table("modality", "placeholder", "encoder", "connector", "boundary tokens")
    for modality in spec.modalities:
        table.add_row(modality.name, modality.placeholder, modality.encoder.type, modality.connector.type,
                      f"{modality.num_prefix_tokens}+{modality.num_suffix_tokens}")
    console.print(table)
    deltas = Table("delta", "kind", "rank", "alpha", "routes")
    for delta in spec.deltas:
        deltas.add_row(delta.name, delta.kind, str(delta.rank or "-"), str(delta.alpha or "-"), ", ".join(delta.routes))
    console.print(deltas)


@app.command()
@one_line_errors
def compose(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory (written atomically).")],
    config: Annotated[Path | None, typer.Argument(
        help="Composition YAML: method (naive|damc), merge, parameters, models.")] = None,
    start: Annotated[Path | None, typer.Option(
        "--from", help="A composed checkpoint to change with --add / --remove instead of a CONFIG.")] = None,
    add: Annotated[list[Path] | None, typer.Option(help="With --from: a modality model to add (repeatable).")]
    = None,
    remove: Annotated[list[str] | None, typer.Option(help="With --from: a model name to remove (repeatable).")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists (only once the new one is complete).")]
    = False,
    lambdas: Annotated[str | None, typer.Option(
        help="Coefficients as the official merge script takes them, replacing the config's: "
             "default-video=0.333,default-audio=0.333,default-vision=0.333 (vision = image).")] = None,
) -> None:
    """Compose single-modality models that share a base LLM into one multimodal checkpoint.

    Example config:

        method: damc
        merge: linear
        models:
          - {path: runs/image, lambda: 0.5}
          - {path: runs/audio, lambda: 0.5}

    Or change a composed checkpoint without recomposing the others:
    mmcompose compose --from composed --add runs/point --remove audio -o composed2
    """
    from mmcompose.checkpoint import read_manifest
    from mmcompose.compose.config import ModelEntry, load_config, parse_config
    from mmcompose.compose.engine import compose as run_composition
    from mmcompose.compose.incremental import recompose

    if (config is None) == (start is None):
        raise MMComposeError("give either a CONFIG file or --from COMPOSED (with --add/--remove), not both")
    if start is None:
        if add or remove:
            raise MMComposeError("--add and --remove change a composed checkpoint: use them with --from")
        settings = load_config(config)
        if lambdas is not None:
            settings = parse_config({**settings.model_dump(by_alias=True, exclude_defaults=True), "lambdas": lambdas},
                                    "--lambdas")
        result = run_composition(settings, out, overwrite=overwrite)
    else:
        if lambdas is not None:
            raise MMComposeError("--lambdas goes with a CONFIG file")
        entries = [ModelEntry(path=path) for path in add or []]
        result = recompose(start, out, add=entries, remove=remove or [], overwrite=overwrite)
    accounting = read_manifest(result).provenance["composition"]["accounting"]
    console.print(f"composed {result}: {accounting['output_tensors']} tensors, "
                  f"{accounting['branch_parameters'] + accounting['delta_parameters']:,} parameters")


@app.command()
@one_line_errors
def merge(
    config: Annotated[Path, typer.Argument(help="Merge YAML: base, merge, parameters, seed, models.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output transformers directory (written atomically).")],
    max_shard_size: Annotated[str, typer.Option(
        help="Largest weight file; above it the weights are sharded with a model.safetensors.index.json "
             "(bytes or 500MB, 2GiB...).")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists (only once the new one is complete).")]
    = False,
) -> None:
    """Merge full fine-tunes of one base LLM (transformers directories, safetensors) into one LLM.

    Example config (methods: linear, ties, dare_linear, dare_ties, magnitude_prune):

        base: models/base
        merge: ties
        parameters: {density: 0.5}
        models:
          - {path: models/math, lambda: 0.5}
          - {path: models/code, lambda: 0.5, density: 0.7}
    """
    from mmcompose.compose.config import load_merge_config
    from mmcompose.compose.llm_merge import merge_llms

    result = merge_llms(load_merge_config(config), out, max_shard_size=max_shard_size, overwrite=overwrite)
    shards = sorted(path.name for path in result.glob("*.safetensors"))
    console.print(f"merged {result}: {len(shards)} weight file(s)")


@app.command()
@one_line_errors
def demo(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run directory; with several seeds, each seed runs in OUT/sSEED and the pooled report "
                            "is OUT/pooled.json.",
        show_default="runs/demo-PROFILE-sSEED per seed, runs/demo-PROFILE-seeds-S1-S2-... pooled")] = None,
    profile: Annotated[str, typer.Option(
        help="default (~9 min cold on 2 cores), quick (CI: fewer steps, rank 8; ~6 min) or large (48 entities, "
             "a larger base LLM; ~25 min).")] = "default",
    seeds: Annotated[str, typer.Option(
        "--seeds", "--seed", help="Seed of the world and of every training run; several comma-separated (0,1,2) "
                                  "run a whole pipeline each and check the claims on all seeds' items pooled.")]
    = "0",
    recipe: Annotated[str, typer.Option(
        help="How the decoupled (DAMC) models train: official (ModelCompose's released scripts: one stage-1 "
             "run for NaiveMC and DAMC, 5+5 boundary tokens per modality created as zeros in stage 2 at the "
             "modality delta's rate, the language delta at the connector's rate, a tenth of the modality "
             "delta's) or one-rate (both deltas at one rate, no boundary tokens); the boundary-token ablation "
             "of the official one: boundary-none (no tokens), boundary-stage1 (tokens trained from stage 1 on). "
             "The shared (NaiveMC) models are the same under all.")] = "official",
    world: Annotated[str | None, typer.Option(
        help="Replace the profile's world: small (24 entities) or large (48). With --base, the ablation of world "
             "size and base LLM size.", show_default="the profile's")] = None,
    base: Annotated[str | None, typer.Option(
        help="Replace the profile's base LLM: small or large.", show_default="the profile's")] = None,
    claims_only: Annotated[bool, typer.Option(
        "--claims-only", help="Train, compose and evaluate only what the paper's claims compare (single models, "
                              "NaiveMC and DAMC linear, DAMC with searched lambda): no joint run, TIES/DARE, "
                              "label-free search or tool and text baselines. Shares run directories with the "
                              "whole demo.")] = False,
    jobs: Annotated[int | None, typer.Option(help="Training runs and evaluations run side by side, one process "
                                                  "each.", show_default="one per CPU core", min=1)] = None,
) -> None:
    """Run the paper's experiment end to end on the synthetic world and print its table and claims.

    Builds (or reuses, from OUT) the world, a text-only base LLM, single-modality models (shared and
    decoupled), a jointly trained model, NaiveMC / DAMC compositions with lambda search, then evaluates
    everything on MCUB-world and the single-modality tests; writes OUT/results.json and OUT/results.png.
    Each claim gets a 95% paired interval and a verdict: holds, does not hold, or undecided (the interval
    straddles the claim's threshold).
    """
    from mmcompose.experiment.demo import run_seeds
    from mmcompose.experiment.plan import demo_plan

    try:
        chosen = [int(seed) for seed in seeds.split(",")]
    except ValueError:
        raise MMComposeError(f"--seeds {seeds!r}: expected integers separated by commas, e.g. 0,1,2") from None
    plan = demo_plan(profile, recipe, world=world, base=base)
    run_seeds(plan.claims_only() if claims_only else plan, chosen, out, console, jobs)


world_app = typer.Typer(no_args_is_help=True, help="The synthetic world: entities, renderings, corpus, data sets.")
app.add_typer(world_app, name="world")


@world_app.command("build")
@one_line_errors
def world_build(
    out: Annotated[Path, typer.Option("--out", "-o", help="World directory to create (written atomically).")],
    seed: Annotated[int, typer.Option(help="Everything in the world is a function of this seed.")] = 0,
    profile: Annotated[str, typer.Option(help="small (24 entities) or large (48 entities).")] = "small",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Generate a world: media in real formats (PNG, WAV, MP4, NPY), text corpus, training and MCUB data."""
    from mmcompose.world import build_world

    build_world(seed, out, profile, overwrite=overwrite)
    console.print(f"built world {out} (seed {seed}, profile {profile})")


@app.command("eval")
@one_line_errors
def evaluate(
    task: Annotated[Path, typer.Option("--task", help="A benchmark JSON file, or a directory of MCUB files "
                                       "(official MCUB-4.json / MCUB-3-*.json + MCUB-answer.json, or a world's).")],
    model: Annotated[Path, typer.Option("--model", help="An mmcompose checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for predictions.jsonl and metrics.json.")],
    data_root: Annotated[Path | None, typer.Option(help="Media paths are relative to this.", show_default="the task's "
                                                   "directory, or its parent for a world's data/")] = None,
    kind: Annotated[str, typer.Option(help="choice (letters), open (VQA-normalised text), label (classes) or "
                                      "caption (free text: corpus BLEU-4 and mean ROUGE-L against the gpt turn "
                                      "and meta.references; raise --max-new-tokens).")]
    = "choice",
    shard: Annotated[str, typer.Option(help="i/n: run shard i of n (merge later with the same command and "
                                       "--shard merge/n).")] = "0/1",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    num_workers: Annotated[int | None, typer.Option(
        min=0, help="Worker processes decoding the media of the next batches while the model answers (0: "
                    "decode in this process, in turn with the model). Results are the same for any value.",
        show_default="one per CPU core but one, at most 4")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Longest answer in tokens.",
                                                       show_default="64 for captions, 16 otherwise")] = None,
    judge: Annotated[str, typer.Option(help="For --kind label: 'names' (label-name matching) or 'embedding' "
                                       "(then the closest label by the model's own token embeddings).")]
    = "names",
    benchmark: Annotated[str | None, typer.Option(
        help="mcub | avqa | music-avqa | modelnet40: read the official file layout (--task: the question file or "
             "its directory) and parse, judge and score as the official scripts do; sets --kind.")] = None,
    answers: Annotated[Path | None, typer.Option(
        help="With --benchmark: the answer file, if not the official one beside the questions.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_folder: OffloadFolderOption = None,
    quantize: QuantizeOption = None,
) -> None:
    """Evaluate a model on a benchmark: per-sample JSONL (resumable) and a metrics JSON per task."""
    from mmcompose.checkpoint import load_checkpoint
    from mmcompose.eval.benchmark import load_benchmark, load_mcub
    from mmcompose.eval.predict import embedding_similarity, model_predictor
    from mmcompose.eval.presets import get_preset, load_preset_tasks
    from mmcompose.eval.runner import default_num_workers, merge_shards, run_benchmark

    if judge not in ("names", "embedding"):
        raise MMComposeError(f"--judge {judge!r}: expected names or embedding")
    index, _, count = shard.partition("/")
    if not count.isdigit() or not (index.isdigit() or index == "merge"):
        raise MMComposeError(f"--shard {shard!r}: expected i/n (e.g. 0/4) or merge/n")
    preset = get_preset(benchmark) if benchmark is not None else None
    if preset is not None:
        kind, max_new_tokens = preset.kind, max_new_tokens or preset.max_new_tokens
        tasks = load_preset_tasks(preset, task, data_root, answers)
    elif answers is not None:
        raise MMComposeError("--answers goes with --benchmark")
    elif task.is_dir():
        root = data_root or (task.parent if task.name == "data" else task)
        tasks = load_mcub(task, root)
    else:
        root = data_root or (task.parent.parent if task.parent.name == "data" else task.parent)
        tasks = {task.stem: load_benchmark(task, root)}
    multiple = len(tasks) > 1
    if index == "merge":
        for name in tasks:
            metrics = merge_shards(out / name if multiple else out, int(count))
            console.print(_caption_summary(name, metrics) if metrics.get("kind") == "caption"
                          else f"{name}: accuracy {metrics['accuracy']:.3f} over {metrics['n']} samples")
        return
    placement = _placement(device, dtype, device_map, max_memory, offload_folder, quantize)
    loaded = load_checkpoint(model, **placement).eval()
    predictor = model_predictor(loaded, max_new_tokens or (64 if kind == "caption" else 16))
    similarity = embedding_similarity(loaded) if judge == "embedding" else None
    for name, samples in tasks.items():
        metrics = run_benchmark(samples, predictor, out / name if multiple else out, name, kind,
                                shard=(int(index), int(count)), batch_size=batch_size, similarity=similarity,
                                scorer=preset.scorer if preset else None,
                                num_workers=default_num_workers() if num_workers is None else num_workers)
        if kind == "caption":
            console.print(_caption_summary(name, metrics))
            continue
        console.print(f"{name}: accuracy {metrics['accuracy'] or 0:.3f} over {metrics['n']} samples "
                      f"({metrics['n_unparseable']} unparseable, {metrics['n_failed']} failed)")


def _caption_summary(name: str, metrics: dict[str, Any]) -> str:
    return (f"{name}: BLEU-4 {metrics['bleu4'] or 0:.3f}, ROUGE-L {metrics['rouge_l'] or 0:.3f} over "
            f"{metrics['n']} samples ({metrics['n_failed']} failed)")


QuantizeOption = Annotated[str | None, typer.Option(
    "--quantize", metavar="8bit|4bit",
    help="Load the base LLM's linears quantized by bitsandbytes (8bit: LLM.int8(); 4bit: NF4), the deltas and "
         "branches in 16-bit beside them (QLoRA's layout; bfloat16 unless --dtype says float16). The text "
         "route's delta is then applied unfused on every token instead of folded.")]
DeviceOption = Annotated[str, typer.Option(
    help="auto (the first GPU if any, else the CPU), cpu, cuda or cuda:N.")]
DtypeOption = Annotated[str, typer.Option(
    help="auto (the base's stored dtype; a float16 base runs in bfloat16 on the CPU), bfloat16, float16 or float32. "
         "Branches and deltas follow it.")]
DeviceMapOption = Annotated[str | None, typer.Option(
    help="Spread the model with accelerate: auto, balanced, sequential, or a JSON object (or .json file) of module "
         "paths of the composed model to a GPU index, cpu or disk, e.g. '{\"llm.model.layers.0\": 0, ...}'.")]
MaxMemoryOption = Annotated[str | None, typer.Option(
    help="With --device-map auto|balanced|sequential: the budget per device, e.g. 0=20GiB,1=20GiB,cpu=30GiB.")]
OffloadFolderOption = Annotated[Path | None, typer.Option(
    help="Allow a device map to put weights on the disk; they are read from their own safetensors files at each "
         "forward, and anything accelerate has to re-save goes here.")]


def _placement(device: str, dtype: str, device_map: str | None, max_memory: str | None,
               offload_folder: Path | None, quantize: str | None) -> dict[str, Any]:
    """The placement flags as `load_checkpoint` keywords (checked there, before anything is loaded)."""
    return dict(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                offload_folder=offload_folder, quantize=quantize)


import_app = typer.Typer(no_args_is_help=True, help="Convert a checkpoint from elsewhere (official ModelCompose, "
                                                    "llava-hf, Video-LLaVA, LLaVA's LoRA release, PEFT) into an "
                                                    "mmcompose checkpoint.")
app.add_typer(import_app, name="import")
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory (written atomically).")]
BaseOption = Annotated[Path, typer.Option("--base", help="The base LLM directory the checkpoint was fine-tuned from.")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace the output directory if it exists (only once the new "
                                                     "one is complete).")]
SVDRankOption = Annotated[int | None, typer.Option(
    help="Store the LLM's change as a LoRA of this rank (truncated SVD; the error is reported) instead of dense.")]
TEMPLATE_HELP = ("Conversation template recorded (tagged or vicuna_v1); models composed together need the same one, "
                 "and the ModelCompose releases use vicuna_v1.")


def _report_import(out: Path) -> None:
    """Say what was imported, and every note the importer recorded (dropped rows, SVD error, zero factors)."""
    from mmcompose.checkpoint import read_manifest

    manifest = read_manifest(out)
    deltas = ", ".join(f"{d.name}->{'+'.join(d.routes)}" for d in manifest.model.deltas) or "none"
    console.print(f"imported {out}: modalities {', '.join(m.name for m in manifest.model.modalities)}; "
                  f"deltas {deltas}")
    for note in manifest.provenance.get("notes", []):
        console.print(f"note: {note}")


ENCODER_HELP = ("MODALITY=SPEC (repeatable): a local CLIP, Whisper or CLAP directory, a Point-BERT state-dict file, "
                "an mmcompose checkpoint with that modality, a JSON file {\"type\": ..., \"options\": ...}, or a "
                "registered encoder name with optional JSON options (whisper-audio, 'point-bert:{\"depth\": 12}').")


@import_app.command("modelcompose")
@one_line_errors
def import_modelcompose_command(
    src: Annotated[Path, typer.Argument(help="Official checkpoint directory: config.json + adapter_model.bin.")],
    out: OutOption,
    base: BaseOption,
    encoder: Annotated[list[str] | None, typer.Option(help=ENCODER_HELP)] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Import an official ModelCompose checkpoint (lora_strategy same, modal+language or modal).

    Example: mmcompose import modelcompose ckpts/vision -o runs/image --base vicuna-7b-v1.5
    --encoder image=clip-vit-large-patch14-336
    """
    from mmcompose.importers import import_modelcompose
    from mmcompose.importers.encoders import parse_encoder_option

    encoders = dict(parse_encoder_option(item) for item in encoder or [])
    _report_import(import_modelcompose(src, out, base=base, encoders=encoders, overwrite=overwrite))


@import_app.command("llava-hf")
@one_line_errors
def import_llava_hf_command(
    src: Annotated[Path, typer.Argument(help="A LlavaForConditionalGeneration directory (save_pretrained).")],
    out: OutOption,
    base: BaseOption,
    svd_rank: SVDRankOption = None,
    template: Annotated[str, typer.Option(help=TEMPLATE_HELP + " Default: llava-hf's own, tagged.")] = "tagged",
    overwrite: OverwriteOption = False,
) -> None:
    """Import a llava-hf LLaVA as an image model: CLIP encoder, mlp2x_gelu connector, LLM delta against BASE."""
    from mmcompose.importers import import_llava_hf

    _report_import(import_llava_hf(src, out, base=base, svd_rank=svd_rank, template=template, overwrite=overwrite))


@import_app.command("video-llava")
@one_line_errors
def import_video_llava_command(
    src: Annotated[Path, typer.Argument(help="A Video-LLaVA directory: the original LlavaLlamaForCausalLM release "
                                             "or VideoLlavaForConditionalGeneration (-hf), told apart by its config.")],
    out: OutOption,
    base: BaseOption,
    svd_rank: SVDRankOption = None,
    encoder: Annotated[list[str] | None, typer.Option(
        help="Original layout only: image=LanguageBind_Image directory and video=LanguageBind_Video_merge "
             "directory (the towers are not in that release).")] = None,
    template: Annotated[str, typer.Option(help=TEMPLATE_HELP)] = "vicuna_v1",
    overwrite: OverwriteOption = False,
) -> None:
    """Import Video-LLaVA as an image + video model: its shared projector as two equal connectors, its LLM
    change as one delta on text, image and video tokens.

    Example: mmcompose import video-llava Video-LLaVA-7B-hf -o runs/video-llava --base vicuna-7b-v1.5 --svd-rank 256
    """
    from mmcompose.importers import import_video_llava
    from mmcompose.importers.encoders import parse_encoder_option

    encoders = dict(parse_encoder_option(item) for item in encoder or [])
    _report_import(import_video_llava(src, out, base=base, svd_rank=svd_rank, encoders=encoders, template=template,
                                      overwrite=overwrite))


@import_app.command("llava-lora")
@one_line_errors
def import_llava_lora_command(
    src: Annotated[Path, typer.Argument(help="A LLaVA LoRA release (llava-v1.5-7b-lora layout): config.json, "
                                             "adapter_config.json, adapter_model.bin, non_lora_trainables.bin.")],
    out: OutOption,
    base: BaseOption,
    encoder: Annotated[str, typer.Option(help="image=CLIP directory: the tower the release names in "
                                              "mm_vision_tower (e.g. clip-vit-large-patch14-336).")],
    template: Annotated[str, typer.Option(help=TEMPLATE_HELP)] = "vicuna_v1",
    overwrite: OverwriteOption = False,
) -> None:
    """Import LLaVA-1.5's LoRA release as an image model: the LoRA as an exact shared delta, its projector as the
    connector.

    Example: mmcompose import llava-lora llava-v1.5-7b-lora -o runs/image-lora --base vicuna-7b-v1.5
    --encoder image=clip-vit-large-patch14-336
    """
    from mmcompose.errors import MMComposeError
    from mmcompose.importers import import_llava_lora
    from mmcompose.importers.encoders import parse_encoder_option

    modality, source = parse_encoder_option(encoder)
    if modality != "image":
        raise MMComposeError(f"--encoder {encoder!r}: a LLaVA LoRA release has one modality, image")
    _report_import(import_llava_lora(src, out, base=base, encoder=source, template=template, overwrite=overwrite))


@import_app.command("peft")
@one_line_errors
def import_peft_command(
    adapter: Annotated[Path, typer.Argument(help="A PEFT LoRA directory: adapter_config.json + "
                                                 "adapter_model.safetensors.")],
    out: OutOption,
    base: BaseOption,
    modality: Annotated[str, typer.Option(help="The modality whose model the adapter belongs to.")],
    from_checkpoint: Annotated[Path | None, typer.Option(
        "--from", help="Take the modality branch (and deltas for other routes) from this mmcompose checkpoint; "
                       "default: a new, untrained branch.")] = None,
    route: Annotated[str, typer.Option(
        help="Tokens the adapter serves: shared (all), language (text only) or modality (the modality's only).")]
    = "shared",
    overwrite: OverwriteOption = False,
) -> None:
    """Import a PEFT LoRA adapter as the LLM delta of a modality model."""
    from mmcompose.importers import import_peft

    _report_import(import_peft(adapter, out, base=base, modality=modality, from_checkpoint=from_checkpoint,
                               route=route, overwrite=overwrite))


@app.command()
@one_line_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="An mmcompose checkpoint directory.")],
    hf: Annotated[Path | None, typer.Option("--hf", help="Output directory (written atomically): a Hugging Face "
                                                         "LLM plus mmcompose/.")] = None,
    llava_hf: Annotated[Path | None, typer.Option("--llava-hf", help="Output directory (written atomically): a "
                                                                     "LlavaForConditionalGeneration.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Export a standalone model, in one of two forms.

    --hf: a Hugging Face LLM with the text delta folded in (loads with AutoModelForCausalLM) plus HF/mmcompose/,
    the modality branches and corrections on top of it.

    --llava-hf: a LlavaForConditionalGeneration directory (config, weights, processor, chat template, <image>
    token) that transformers, vLLM, SGLang and TGI serve as it is. Only a model that is a plain LLaVA can go
    there: one CLIP image modality with an mlp2x_gelu or linear connector, no boundary tokens, and one LLM
    change on every token (a single modality model, or NaiveMC); anything else is refused in one line.
    """
    from mmcompose.importers import export_hf
    from mmcompose.importers.export import export_llava_hf

    if (hf is None) == (llava_hf is None):
        raise MMComposeError("give exactly one of --hf OUT and --llava-hf OUT")
    if hf is not None:
        console.print(f"exported {export_hf(checkpoint, hf, overwrite=overwrite)}")
        return
    out, notes = export_llava_hf(checkpoint, llava_hf, overwrite=overwrite)
    console.print(f"exported {out} (LlavaForConditionalGeneration)")
    for note in notes:
        console.print(f"note: {note}")


@app.command("inspect")
@one_line_errors
def inspect_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="mmcompose checkpoint directories on one base LLM.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every per-layer number to this JSON file.")]
    = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a layers x modules heat map to this .png.")]
    = None,
) -> None:
    """Measure how the checkpoints' LLM deltas interfere, per layer and module: each delta's norm, pairwise
    cosine and sign-conflict rate, for language deltas and modality deltas separately.

    Reads tensors lazily, one module at a time. Example: mmcompose inspect runs/image runs/audio --plot i.png
    """
    from mmcompose.compose.diagnostics import (
        inspect_checkpoints,
        plot_report,
        render_table,
        require_png,
        write_report_json,
    )

    if plot is not None:
        require_png(plot)
    report = inspect_checkpoints(checkpoints)
    console.print(render_table(report))
    if json_out is not None:
        console.print(f"wrote {write_report_json(report, json_out)}")
    if plot is not None:
        console.print(f"wrote {plot_report(report, plot)}")


@app.command()
@one_line_errors
def chat(
    model: Annotated[Path, typer.Option("--model", help="An mmcompose checkpoint.")],
    question: Annotated[str | None, typer.Argument(
        help="Ask this once and print the answer; without it, start an interactive session.")] = None,
    inputs: Annotated[list[str] | None, typer.Option(
        "--input", "-i", metavar="MODALITY=PATH",
        help="A file for the (first) message, for any modality of the model (repeatable): image=cat.png, "
             "audio=meow.wav, or a composed model's renamed modality.")] = None,
    base: Annotated[Path | None, typer.Option(help="The base LLM directory, if not where the checkpoint says.")]
    = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 decodes greedily; above 0 samples.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampler (with --temperature > 0).")] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_folder: OffloadFolderOption = None,
    quantize: QuantizeOption = None,
) -> None:
    """Talk to a model about its modalities' files (images, audio, ...); answers stream as they are generated.

    Placeholders (<image>, <audio>, ...) are put at the start of the message, one line per input, unless the
    question places them itself. Interactive commands: /MODALITY PATH (/image PATH, /audio PATH, ...)
    attaches a file to the next message; /reset clears the conversation; /quit or Ctrl-D exits.

    Example: mmcompose chat --model runs/composed -i image=cat.png -i audio=meow.wav "What makes this sound?"
    """
    from mmcompose.chat import chat as run_chat
    from mmcompose.chat import parse_inputs
    from mmcompose.checkpoint import load_checkpoint

    attachments = parse_inputs(inputs or [])
    placement = _placement(device, dtype, device_map, max_memory, offload_folder, quantize)
    loaded = load_checkpoint(model, base=base, **placement)
    run_chat(loaded.eval(), attachments, question, max_new_tokens=max_new_tokens,
             temperature=temperature, seed=seed)


@app.command()
@one_line_errors
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="An mmcompose checkpoint directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY' on /v1/ requests.")]
    = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests decoded together in one forward.")] = 8,
    allowed_media_dir: Annotated[Path | None, typer.Option(
        help="Media may be given as paths (or file: URLs) inside this directory; without it, only data: URLs.")]
    = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 512,
    request_timeout: Annotated[float, typer.Option(min=1.0, help=(
        "Seconds a request may take in all (queue, prefill and answer); raise it for a model offloaded to the "
        "disk, where one answer takes minutes."))] = 120.0,
    max_media: Annotated[int, typer.Option(min=0, help="Most media parts in one request.")] = 8,
    max_media_mb: Annotated[float, typer.Option(min=0.01, help="Largest media part, in MiB.")] = 20.0,
    base: Annotated[Path | None, typer.Option(help="The base LLM directory, if not where the checkpoint says.")]
    = None,
    allowed_origins: Annotated[list[str] | None, typer.Option(
        metavar="ORIGIN", help="Web origins (scheme://host:port; repeatable or comma-separated; * for any) whose "
                               "pages may call the API besides the server's own page; requests from other "
                               "origins are refused.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_folder: OffloadFolderOption = None,
    quantize: QuantizeOption = None,
) -> None:
    """Serve a model over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models) with a web chat
    page at /. Concurrent requests are decoded together (up to --max-batch rows per forward).

    Requests a web page could make the browser send are refused: a cross-origin Origin not in
    --allowed-origins (403), a body that is not application/json (415), and, bound to loopback, a Host header
    other than localhost, 127.0.0.1 or [::1] (403, DNS rebinding).

    Example: mmcompose serve runs/composed --port 8000, then open http://127.0.0.1:8000/
    """
    from mmcompose.serve import serve as run_server

    run_server(checkpoint, host=host, port=port, api_key=api_key, max_batch=max_batch,
               allowed_media_dir=allowed_media_dir, max_tokens=max_tokens, request_seconds=request_timeout,
               max_media=max_media, max_media_mb=max_media_mb, base=base, allowed_origins=allowed_origins,
               placement=_placement(device, dtype, device_map, max_memory, offload_folder, quantize))


train_app = typer.Typer(no_args_is_help=True, help="Train the base LLM and modality models.")
app.add_typer(train_app, name="train")


@train_app.command("base")
@one_line_errors
def train_base(
    world: Annotated[Path, typer.Option(help="A world directory (mmcompose world build): corpus/ and data/.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the base LLM (written atomically).")],
    profile: Annotated[str, typer.Option(help="small (for the small world; ~2.5 min on 2 cores) or large "
                                              "(for the large world; ~5 min).")] = "small",
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and of the data order.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Pretrain the world's base LLM from scratch on its corpus: tokenizer + small LLaMA, then evaluate it.

    Writes OUT (a transformers model directory) with metrics.json: perplexity on corpus/valid.txt and
    text-only attribute multiple-choice accuracy on data/text_qa.json.
    """
    from mmcompose.data import names
    from mmcompose.train.base_llm import pretrain_base

    corpus, text_qa = world / "corpus", world / names.DATA_DIR / names.TEXT_QA_FILE
    metrics = pretrain_base(corpus / "train.txt", corpus / "valid.txt", out, profile=profile, seed=seed,
                            text_qa=text_qa if text_qa.is_file() else None, overwrite=overwrite)
    accuracy = f", text QA accuracy {metrics['text_qa_accuracy']:.3f}" if "text_qa_accuracy" in metrics else ""
    console.print(f"base LLM {out}: valid perplexity {metrics['valid_perplexity']:.2f}{accuracy} "
                  f"({metrics['seconds']:.0f}s)")


@train_app.command("modality")
@one_line_errors
def train_modality(
    base: Annotated[Path, typer.Option(help="The base LLM directory: a local LLaMA, Mistral or Qwen2 with its "
                                            "tokenizer.")],
    data: Annotated[list[Path] | None, typer.Option(
        help="A training JSON file in the benchmark layout (repeatable; required unless --dry-run).")] = None,
    data_root: Annotated[Path | None, typer.Option(
        help="Media paths in the data files are relative to this (required unless --dry-run).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run directory: model/, checkpoints/, log.jsonl (required unless --dry-run).")] = None,
    recipe: Annotated[Path | None, typer.Option(
        help="A recipe YAML (recipes/*.yaml): model and training settings; the flags below override it.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of TrainConfig fields; flags override it.")] = None,
    modality: Annotated[str | None, typer.Option(
        help="Modality, or several comma-separated for joint training (required here or in --recipe).")] = None,
    stage: Annotated[str | None, typer.Option(
        help="pretrain (branches only, on captions) or instruct (deltas too); required here, in --config or "
             "in --recipe.")] = None,
    strategy: Annotated[str | None, typer.Option(
        help="connector-only, shared, decoupled or full (default: connector-only for pretrain).")] = None,
    start_from: Annotated[list[Path] | None, typer.Option(
        "--from", help="Checkpoint(s) whose modality branches this run starts from, e.g. stage 1 (repeatable).")]
    = None,
    encoder: Annotated[list[str] | None, typer.Option(help=ENCODER_HELP + " Pretrained encoders stay frozen "
                                                      "unless --train-encoder.")] = None,
    connector: Annotated[str | None, typer.Option(
        help="Connector of new branches: linear, mlp2x_gelu, resampler or another registered one, optionally "
             "NAME:{json options}.")] = None,
    boundary_tokens: Annotated[int | None, typer.Option(
        help="Learnable prefix and suffix tokens (each) around every input of a new branch (DAMC: 5).")] = None,
    template: Annotated[str | None, typer.Option(
        help="Conversation template: vicuna_v1 (LLaVA-1.5's), plain (LLaVA's stage-1 captions: the inputs, the caption "
             "and a newline, no role tags), tagged (USER:/ASSISTANT: tags, no system prompt), or chat (the base "
             "tokenizer's own chat template, rendered by transformers and recorded in the checkpoint so chat, eval "
             "and serve format prompts the same way). Every assistant turn trains. Default: the --from "
             "checkpoint's; vicuna_v1 for a base whose name says vicuna; chat for a base whose tokenizer has a chat "
             "template (e.g. Qwen2, Mistral); tagged otherwise.")] = None,
    train_encoder: Annotated[bool | None, typer.Option(
        help="Train the encoders too (default: only those not loaded from pretrained weights).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides epochs).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the data (default: 1).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per micro-batch and process (default: 16).")]
    = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches accumulated per optimizer step.")] = None,
    mixed_precision: Annotated[str | None, typer.Option(
        help="bf16, fp16 (GPU only) or no (default: the accelerate launch configuration's, else no).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        help="Recompute decoder-layer activations in the backward pass (less memory, ~30% more time).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest training sequence in tokens.")] = None,
    lr: Annotated[float | None, typer.Option(help="One peak learning rate for every parameter group.")] = None,
    language_lr: Annotated[float | None, typer.Option(
        min=0.0, help="Peak learning rate of the language delta (strategy decoupled; ModelCompose's DAMC runs use "
                      "a tenth of the modality delta's rate).", show_default="the rate of the other deltas")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay of weight matrices.")] = None,
    lora_dropout: Annotated[float | None, typer.Option(
        help="Dropout on the LoRA deltas' inputs while training (ModelCompose's recipes: 0.05; default: 0).")]
    = None,
    warmup_ratio: Annotated[float | None, typer.Option(help="Linear warmup share of the cosine schedule.")] = None,
    encoder_steps: Annotated[int | None, typer.Option(
        help="pretrain: first train each encoder alone to tell its captions apart, for this many steps (an encoder "
             "that starts from random weights learns slowly through the frozen LLM; default: 0).")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank of the deltas (default: 16).")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: 2 x rank).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Step checkpoint every N steps (0: none).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest step checkpoint in OUT.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of new parameters and of the data order (default: 0).")]
    = None,
    on_bad_sample: Annotated[str | None, typer.Option(
        help="stop: an invalid sample (bad shape, missing medium, a modality the model lacks, placeholders that "
             "do not match its media) is an error before training, each one named; skip: leave such samples "
             "out and count them (default: stop).")] = None,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader worker processes decoding media "
                                                         "(default: 0, in the training process).")] = None,
    cache_features: Annotated[Path | None, typer.Option(
        help="Directory caching frozen encoders' outputs (safetensors, keyed by file digest and encoder "
             "fingerprint), reused across epochs and runs; needs train_encoder false.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Build the model and print what would train (each parameter group's peak learning rate "
                          "and size), then stop; a finished run records the same in metrics.json.")] = False,
) -> None:
    """Train a modality model: stage 1 (pretrain) or stage 2 (instruct, starting --from stage 1).

    Stage 1 trains the connector and boundary tokens (and encoders that are not pretrained) on captions with the
    LLM frozen; stage 2 also trains the LLM deltas of STRATEGY. Step checkpoints (--save-every) make a run
    resumable (--resume).

    Several processes or GPUs: accelerate launch --config_file configs/accelerate/ddp.yaml (or fsdp.yaml,
    deepspeed_zero2.yaml, deepspeed_zero3.yaml) -m mmcompose.cli train modality ... (on a machine without GPUs,
    DDP runs on CPU over gloo and FSDP2 too; DeepSpeed needs GPUs).

    Example: mmcompose train modality --base runs/base --modality image --data world/data/image_caption.json
    --data-root world --stage pretrain -o runs/image-stage1
    """
    from accelerate import PartialState

    from mmcompose.train.run import model_overrides, resolve_run, run_modality_training, trained_groups

    rates = None if lr is None else {"encoder": lr, "connector": lr, "boundary": lr, "deltas": lr}
    train_values = dict(stage=stage, steps=steps, epochs=epochs, batch_size=batch_size, lr=rates,
                        encoder_steps=encoder_steps, save_every=save_every, seed=seed, grad_accum=grad_accum,
                        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
                        weight_decay=weight_decay, warmup_ratio=warmup_ratio, train_encoder=train_encoder,
                        lora_dropout=lora_dropout)
    data_values = dict(on_bad_sample=on_bad_sample, num_workers=num_workers, cache_features=cache_features,
                       max_length=max_length)
    model_values = model_overrides(modality, strategy, rank, alpha, encoder or [], connector, boundary_tokens,
                                   template)
    run = resolve_run(recipe, config, model_values, train_values, data_values)
    if language_lr is not None:
        lr_set = run.train.lr.model_copy(update={"language": language_lr})
        run = run.model_copy(update={"train": run.train.model_copy(update={"lr": lr_set})})
    if dry_run:
        groups = trained_groups(base, run, start_from or [])
        console.print(f"{run.train.stage}, strategy {run.model.strategy or 'connector-only'}, LoRA dropout "
                      f"{run.train.lora_dropout:g}; trained groups:")
        for name, group in groups.items():
            console.print(f"  {name}: lr {group['lr']:g}, {group['parameters']:,} parameters")
        return
    missing = [flag for flag, value in (("--data", data), ("--data-root", data_root), ("--out", out)) if not value]
    if missing:
        raise MMComposeError(f"{', '.join(missing)} required (unless --dry-run)")
    metrics = run_modality_training(base=base, data=data, data_root=data_root, out=out, recipe=run,
                                    start_from=start_from or [], resume=resume)
    if PartialState().is_main_process:
        names = "+".join(metrics["modalities"])
        console.print(f"trained {names} ({metrics['stage']}, {metrics['strategy']}): {metrics['steps']} steps, loss "
                      f"{metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f} ({metrics['seconds']:.0f}s); "
                      f"model in {out / 'model'}")
        dropped = metrics["skipped_samples"]
        if any(dropped.values()):
            console.print(f"skipped {dropped['invalid']} invalid and {dropped['too_long']} too long sample(s), "
                          f"listed in {out / 'skipped_samples.txt'}")


if __name__ == "__main__":
    app()
