"""Lambda search: coordinate moves from uniform, strict improvements only, every trial logged."""

from __future__ import annotations

import json
from pathlib import Path

from mmcompose.compose.config import parse_config
from mmcompose.experiment.search import search_lambdas
from mmcompose.model import MultimodalLLM
from tests.compose.test_engine import _train_free_model


def _lambdas(model: MultimodalLLM) -> dict[str, float]:
    return {m["name"]: m["lambda"] for m in model.provenance["composition"]["models"]}


def test_search_climbs_a_known_objective(llama_base: Path, tmp_path: Path) -> None:
    paths = [_train_free_model(llama_base, tmp_path / m, m, "decoupled", seed=i)
             for i, m in enumerate(("image", "audio"))]
    config = parse_config({"method": "damc", "models": [{"path": str(p)} for p in paths]})

    def criterion(model: MultimodalLLM) -> float:  # best at image 1.0, audio 0.25
        lambdas = _lambdas(model)
        return -abs(lambdas["image"] - 1.0) - abs(lambdas["audio"] - 0.25)

    log = tmp_path / "search.jsonl"
    result = search_lambdas(config, criterion, log, factors=(0.5, 2.0), rounds=3)
    assert result.lambdas == {"image": 1.0, "audio": 0.25}
    assert result.uniform_score == -0.75 and result.score == 0.0
    trials = [json.loads(line) for line in log.read_text().splitlines()]
    assert trials[0]["lambdas"] == {"image": 0.5, "audio": 0.5}
    assert len(trials) == len(result.trials) == len({tuple(t["lambdas"].values()) for t in trials})
