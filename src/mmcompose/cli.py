"""The `mmcompose` command line. Every user-facing failure is one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mmcompose.errors import MMComposeError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
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
    config: Annotated[Path, typer.Argument(help="Composition YAML: method (naive|damc), merge, parameters, models.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory (written atomically).")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists (only once the new one is complete).")]
    = False,
) -> None:
    """Compose single-modality models that share a base LLM into one multimodal checkpoint.

    Example config:

        method: damc
        merge: linear
        models:
          - {path: runs/image, lambda: 0.5}
          - {path: runs/audio, lambda: 0.5}
    """
    from mmcompose.compose.config import load_config
    from mmcompose.compose.engine import compose as run_composition

    result = run_composition(load_config(config), out, overwrite=overwrite)
    accounting = json.loads((result / "manifest.json").read_text())["provenance"]["composition"]["accounting"]
    console.print(f"composed {result}: {accounting['output_tensors']} tensors, "
                  f"{accounting['branch_parameters'] + accounting['delta_parameters']:,} parameters")


@app.command()
@one_line_errors
def demo() -> None:
    """Run the paper's experiment end to end on the synthetic world (not built yet)."""
    console.print("mmcompose demo: not built yet (the synthetic-world experiment lands with issue 4).")


if __name__ == "__main__":
    app()
