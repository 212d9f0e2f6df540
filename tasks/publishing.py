"""Tasks that judge and publish a run: bless (re-score the champion), the run folder, promotion.

Thin wrappers over covid_registry.bless, covid_registry.champion and covid_registry.run_folder;
then the retrain flow's run bookkeeping: its run id, the per-stage clock, the app bundle's record
and the checks that fail a run after it is published.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from covid_data.store import open_store
from covid_registry import champion as registry
from covid_registry.bless import bless, external_gate, false_alarm_gate
from covid_registry.run_folder import complete_run, report_markdown, write_run_folder
from tasks.app import build_app


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
    require_significance: bool = True,
    covid_noninferiority_margin: float | None = 0.05,
    externals: dict[str, list[dict[str, Any]]] | None = None,
    external_floor: float | None = None,
    external_false_alarm_ceiling: float | None = None,
) -> dict[str, Any] | None:
    """Score the current champion's stored model on the challenger's test split and decide,
    on the same images, whether the challenger earns promotion (TFX's Evaluator); with
    ``external_floor``, the challenger's accuracy on every labelled external set (``externals``, per
    model) must reach it too, and with ``external_false_alarm_ceiling`` its COVID false-alarm rate
    on every negative set must not exceed it."""
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
            covid_noninferiority_margin=covid_noninferiority_margin,
        )
    )
    mine = (externals or {}).get(challenger["model"], [])
    blessing = external_gate(blessing, mine, external_floor)
    blessing = false_alarm_gate(blessing, mine, external_false_alarm_ceiling)
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
    externals: dict[str, list[dict[str, Any]]] | None = None,
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
        externals=externals,
    )


@task(name="promote")
def promote_champion(
    store: str,
    candidate: dict[str, Any] | None,
    exports: list[dict[str, Any]],
    blessing: dict[str, Any] | None,
    not_ready: str | None,
) -> dict[str, Any] | None:
    """Swap ``champion.json`` to the candidate if it was blessed (compare-and-swap; every
    decision goes to the champion history): TFX's Pusher. It runs last, once everything the
    champion points to (run folder, exports, app bundle) is complete; ``not_ready`` says what is
    not, and then nothing is promoted."""
    if candidate is None or blessing is None:
        return None
    if not_ready and blessing.get("blessed"):
        blessing = {**blessing, "blessed": False, "reason": f"not promoted: {not_ready}"}
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
    seconds: dict[str, float],
    app: dict[str, Any] | None = None,
    *,
    explain: list[dict[str, Any]] | None = None,
    externals: dict[str, list[dict[str, Any]]] | None = None,
    shortcut_audit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report (file and ``retrain-report`` artifact), then ``run.json``, the run's marker.
    ``shortcut_audit``: the data's audit (``tasks.audit.audit_data``), when the run made one."""
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
        # Promotion comes after this marker (the champion never points at an incomplete run): the
        # decision itself is in the champion history, champion/history/<seq>.json.
        "promotion": _promotion(blessing),
        "seconds": seconds,  # per stage, up to publishing
        "app": app,
        "explain": explain,
        "external": externals or {},
        "shortcut_audit": shortcut_audit,
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


def _promotion(blessing: dict[str, Any] | None) -> dict[str, Any]:
    if not blessing:
        return {"pending": False, "reason": "no challenger"}
    if blessing.get("blessed"):
        return {"pending": True, "reason": f"blessed ({blessing['reason']}); promoted once this run is complete"}
    return {"pending": False, "reason": f"not promoted: {blessing['reason']}"}


def not_ready(exports_ok: bool, app: dict[str, Any]) -> str | None:
    """What stops a blessed challenger from being pushed: what the champion would point to is incomplete."""
    if not exports_ok:
        return "the top models' exports did not all succeed"
    if app.get("status") == "failed":
        return f"the app bundle failed ({app.get('reason')})"
    return None


# -- the retrain flow's run bookkeeping ------------------------------------------------------------
def run_id() -> str:
    """Stable across retries of one flow run (its scheduled start and id), so a retried run
    completes its own folder instead of leaving a second one."""
    start = runtime.flow_run.scheduled_start_time or datetime.now(UTC)
    return f"{start:%Y%m%dT%H%M%SZ}-{str(runtime.flow_run.id or 'local')[:8]}"


class StageClock:
    """Seconds per stage, each lap measured from the previous one (``run.json``'s ``seconds``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._clock, 1)
        self._clock = now


def trained_all(records: list[dict[str, Any]]) -> bool:
    """Every configured model trained or was reused (a model skipped for want of its weights file counts)."""
    return all(r["status"] in ("trained", "cached", "skipped") for r in records)


def blessed_uri(candidate: dict[str, Any] | None, blessing: dict[str, Any] | None) -> str | None:
    """The model the app marks as champion when this run's challenger is about to be promoted."""
    return candidate["model_uri"] if candidate and blessing and blessing.get("blessed") else None


def app_bundle(
    store: str,
    run_id: str,
    dataset: dict[str, Any],
    exports: list[dict[str, Any]],
    explain: list[dict[str, Any]],
    champion_uri: str | None = None,
    externals: dict[str, list[dict[str, Any]]] | None = None,
    lungs_uri: str | None = None,
) -> dict[str, Any]:
    """The app-bundle task's record, or ``{"status": "failed", "reason"}`` when the task failed (the
    run is completed first, then fails: see :func:`check_run`)."""
    state = build_app(store, run_id, dataset, exports, explain, champion_uri, externals, lungs_uri, return_state=True)
    return state.result() if state.is_completed() else {"status": "failed", "reason": state.message}


def check_run(
    top: list[dict[str, Any]],
    needed: int,
    records: list[dict[str, Any]],
    exports: list[dict[str, Any]],
    app: dict[str, Any],
) -> None:
    """Fail the (already completed) run when fewer models trained than the top models it needs, an
    export failed, or the app bundle failed."""
    if len(top) < needed:
        failures = [(r["model"], str(r.get("error"))[:200]) for r in records if r["status"] == "failed"]
        candidates = sum(r["status"] != "skipped" for r in records)
        raise RuntimeError(
            f"only {len(top)} of {candidates} models trained; {needed} are needed for the "
            f"top three. Failures: {failures}"
        )
    if len(exports) != len(top):
        raise RuntimeError(f"exports failed for {sorted({r['model'] for r in top} - {e['model'] for e in exports})}")
    if app["status"] == "failed":
        raise RuntimeError(f"the app bundle failed: {app['reason']}")
