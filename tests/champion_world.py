"""The champion tests' world: real tiny models (custom_cnn, 32 px, one epoch) trained on real X-rays.

Built once per session by the ``world`` fixture (tests/conftest.py) and shared by
tests/test_champion.py (promotion decisions) and tests/test_champion_history.py (history,
rollback, crash safety, command line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from covid_data.store import open_store, split_object_uri
from covid_registry.champion import history

# The comparison rules alone: tests of significance and COVID non-inferiority turn those on.
RULES = {
    "run_succeeded": True,
    "margin": 0.0,
    "covid_sensitivity_floor": 0.0,
    "require_significance": False,
    "covid_noninferiority_margin": None,
}


@dataclass
class World:
    split_a: str  # 60/20/20, seed 42: the champion's split
    split_b: str  # 60/20/20, seed 7: the challenger's (its test overlaps A's train)
    split_c: str  # 80/20/0: no test split
    champ: str  # model slots
    chal: str
    notest: str
    capped: str
    cache: str


def train(split: str, out: Path, cache: Path, seed: int, max_per_class: int | None = None) -> str:
    from covid_models.train import TrainConfig, train_model

    cfg = TrainConfig(
        model="custom_cnn",
        split=split,
        out=str(out),
        input_size=32,
        epochs=1,
        weights="none",
        patience=0,
        batch_size=8,
        seed=seed,
        max_per_class=max_per_class,
        cache_dir=str(cache),
        verbose=0,
    )
    train_model(cfg)
    return str(out)


def build_world(small_split: str, tmp_path_factory) -> World:
    from covid_data.dataset import load_manifest
    from covid_data.split import SplitConfig, write_split

    split_store, _ = split_object_uri(small_split)
    root, version = split_store.uri.split("/datasets/")[0], split_store.uri.split("/datasets/")[1].split("/")[0]
    store = open_store(root)
    manifest = load_manifest(store, version)
    split_b = write_split(store, version, manifest, SplitConfig(0.6, 0.2, 0.2, seed=7)).uri
    split_c = write_split(store, version, manifest, SplitConfig(0.8, 0.2, 0.0)).uri
    base = tmp_path_factory.mktemp("champion-models")
    cache = base / "cache"
    return World(
        split_a=small_split,
        split_b=split_b,
        split_c=split_c,
        champ=train(small_split, base / "champ", cache, seed=1),
        chal=train(split_b, base / "chal", cache, seed=2),
        notest=train(split_c, base / "notest", cache, seed=3),
        capped=train(split_b, base / "capped", cache, seed=4, max_per_class=2),
        cache=str(cache),
    )


def history_actions(store_uri: str) -> list[tuple[int, str]]:
    """``[(seq, action), ...]`` of the store's champion history."""
    return [(e["seq"], e["action"]) for e in history(store_uri)]
