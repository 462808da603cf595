"""Shared fixtures: one quick-profile world, built once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmcompose.world import build_world

QUICK_SEED = 7  # test_world_build.py repeats this value


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A world built with the quick profile (the build itself is part of what is tested)."""
    return build_world(QUICK_SEED, tmp_path_factory.mktemp("built") / "world", profile="quick")


@pytest.fixture(scope="session")
def data_files(quick_world: Path) -> dict[str, list[dict[str, Any]]]:
    """Every data file of the quick world, by file stem."""
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((quick_world / "data").glob("*.json"))}
