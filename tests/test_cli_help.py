"""Every command and sub-command explains itself with --help."""

from __future__ import annotations

from typer.main import get_command
from typer.testing import CliRunner

from mmcompose.cli import app


def _paths(command, prefix: list[str]) -> list[list[str]]:
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _paths(sub, [*prefix, name])
    return paths


def test_every_command_has_help() -> None:
    root = get_command(app)
    paths = _paths(root, [])
    assert {"compose", "demo", "eval", "show", "inspect", "chat", "export"} <= {p[0] for p in paths if p}
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output and len(result.output.splitlines()) > 3, path


def _commands(command) -> list:
    return [command, *(c for sub in getattr(command, "commands", {}).values() for c in _commands(sub))]


def test_no_help_text_holds_square_brackets() -> None:
    """Rich reads `[...]` in a help text as markup and drops it: `[default: x]` once vanished from --help."""
    for command in _commands(get_command(app)):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        assert not [t for t in texts if "[" in t and "]" in t], command.name
