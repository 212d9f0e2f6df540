"""Tasks that judge and publish a run: bless (re-score the champion), the run folder, promotion.

Thin wrappers over covid_registry.bless, covid_registry.champion and covid_registry.run_folder.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from covid_data.store import open_store
from covid_registry import champion as registry
from covid_registry.bless import bless
from covid_registry.run_folder import complete_run, report_markdown, write_run_folder


def _plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


@task(name="bless")
def bless_challenger(
    challenger: dict[str, Any] | None,
    store: str,
    *,
    training_succeeded: bool,
    margin: float,
    floor: float,
    require_significance: bool = False,
) -> dict[str, Any] | None:
    """Score the current champion's stored model on the challenger's test split and decide,
    on the same images, whether the challenger earns promotion (TFX's Evaluator)."""
    if challenger is None:
        return None
    current = registry.current(open_store(store))
    blessing = _plain(
        bless(
            challenger,
            current,
            run_succeeded=training_succeeded,
            margin=margin,
            covid_sensitivity_floor=floor,
            require_significance=require_significance,
        )
    )
    get_run_logger().info("bless: %s", blessing["reason"])
    return blessing


@task(name="publish-run")
def publish_run(
    store: str,
    run_id: str,
    dataset: dict[str, Any],
    board: dict[str, Any],
    records: list[dict[str, Any]],
    exports: list[dict[str, Any]],
    blessing: dict[str, Any] | None,
    explain: list[dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Copy the run's models, exports, model cards and leaderboard into ``runs/<run id>/``."""
    return write_run_folder(
        store,
        run_id,
        dataset=dataset,
        board_rows=board["rows"],
        board_markdown=board["markdown"],
        records=records,
        exports=exports,
        blessing=blessing,
        explain=explain,
    )


@task(name="promote")
def promote_champion(
    store: str,
    candidate: dict[str, Any] | None,
    exports: list[dict[str, Any]],
    blessing: dict[str, Any] | None,
    exports_ok: bool,
) -> dict[str, Any] | None:
    """Swap ``champion.json`` to the candidate if it was blessed (compare-and-swap; every
    decision goes to the champion history): TFX's Pusher."""
    if candidate is None or blessing is None:
        return None
    if not exports_ok and blessing.get("blessed"):
        blessing = {**blessing, "blessed": False, "reason": "the top models' exports did not all succeed"}
    mine = next((e for e in exports if e["model"] == candidate["model"]), None)
    uris = {v: rec["uri"] for v, rec in mine["variants"].items()} if mine else {}
    decision = _plain(registry.decide_and_promote(open_store(store), {**candidate, "exports": uris}, blessing))
    get_run_logger().info("champion: %s", decision["reason"])
    return decision


@task(name="complete-run")
def finish_run(
    store: str,
    run_id: str,
    dataset: dict[str, Any],
    preset: dict[str, Any],
    board: dict[str, Any],
    records: list[dict[str, Any]],
    models: dict[str, str],
    exports: list[dict[str, Any]],
    blessing: dict[str, Any] | None,
    decision: dict[str, Any] | None,
    seconds: dict[str, float],
    app: dict[str, Any] | None = None,
    *,
    explain: list[dict[str, Any]] | None = None,
    externals: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The report (file and ``retrain-report`` artifact), then ``run.json``, the run's marker."""
    ok = all(r["status"] in ("trained", "cached", "skipped") for r in records)  # skipped: no weights file
    run = {
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": dataset,
        "preset": preset,
        "succeeded": ok
        and bool(exports)
        and len(exports) == min(3, sum(r["status"] in ("trained", "cached") for r in records)),
        "models": models,
        "records": records,
        "exports": exports,
        "blessing": blessing,
        "champion": decision,
        "seconds": seconds,  # per stage, up to publishing
        "app": app,
        "explain": explain,
        "external": externals or {},
    }
    report = report_markdown(run, board["markdown"], store=open_store(store))
    stored = complete_run(store, run_id, run, report)
    create_markdown_artifact(report, key="retrain-report", description=f"retrain {run_id}")
    s = open_store(store)
    for e in exports:
        pkg = e["variants"]["coreml"]["file"]
        uri = s.uri_for(f"runs/{run_id}/exports/{e['model']}/{pkg}")
        create_link_artifact(uri, link_text=pkg, description=f"Core ML package of {e['model']}")
    return stored
