"""Every command and sub-command explains itself with --help."""

from __future__ import annotations

import re
from typing import Any

from typer.main import get_command
from typer.testing import CliRunner

from mmcompose.cli import app


def _tree(command, prefix: list[str]) -> list[tuple[list[str], Any]]:
    """Every command under `command` (itself included) with the words that call it."""
    found = [(prefix, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found += _tree(sub, [*prefix, name])
    return found


def _paths(command, prefix: list[str]) -> list[list[str]]:
    return [path for path, _ in _tree(command, prefix)]


def test_every_command_has_help() -> None:
    root = get_command(app)
    paths = _paths(root, [])
    assert {"compose", "demo", "eval", "show", "inspect", "chat", "export"} <= {p[0] for p in paths if p}
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output and len(result.output.splitlines()) > 3, path


def _option_row(name: str) -> re.Pattern[str]:
    """A line of an options table that declares `name`: after a short indent (or a panel border and the
    required star; a description's continuation lines are indented further), only other names of the same option
    (`-o, --out`, `--resume / --no-resume`) may come before it."""
    return re.compile(r"^[ │*]{0,6}(?:-{1,2}[\w-]+(?:,\s*|\s+/\s+|\s+))*" + re.escape(name) + r"(?![\w-])",
                      re.MULTILINE)


def test_every_option_name_is_whole_at_80_columns() -> None:
    """Rich's options table cut long names (`--mixed-precis…`) to fit 80 columns; click's own help layout,
    which the app uses, moves the description to the next line instead."""
    runner = CliRunner()
    checked = 0
    for path, command in _tree(get_command(app), []):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        assert max(len(line) for line in result.output.splitlines()) <= 80, path
        for param in command.params:
            if param.param_type_name == "option":
                for name in [*param.opts, *param.secondary_opts]:
                    assert _option_row(name).search(result.output), (path, name, result.output)
                    checked += 1
    assert checked > 100  # the walk reached the sub-commands' options
