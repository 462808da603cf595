"""Shared fixtures: one small-profile world, built once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmcompose.world import build_world

SMALL_SEED = 7  # test_world_build.py repeats this value


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A world built with the small profile (the build itself is part of what is tested)."""
    return build_world(SMALL_SEED, tmp_path_factory.mktemp("built") / "world", profile="small")


@pytest.fixture(scope="session")
def data_files(small_world: Path) -> dict[str, list[dict[str, Any]]]:
    """Every data file of the small world, by file stem."""
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((small_world / "data").glob("*.json"))}
