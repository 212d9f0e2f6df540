"""The phone app's task: fit the out-of-distribution guard, then write the run's app bundle.

A thin wrapper over covid_app; a bundle that cannot be built here (no Node.js) is skipped with the
reason, and never fails the models that were trained and published.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from covid_app.bundle import AppBuildUnavailable, build_run_app
from covid_data.store import open_store


@task(name="app-bundle")
def build_app(
    store: str,
    run_id: str,
    dataset: dict[str, Any],
    exports: list[dict[str, Any]],
    explain: list[dict[str, Any]] | None = None,
    champion_uri: str | None = None,
    externals: dict[str, list[dict[str, Any]]] | None = None,
    lungs_uri: str | None = None,
) -> dict[str, Any]:
    """``{"status": "built"|"skipped"|"failed", ...}``: the bundle's record, or why there is none."""
    log = get_run_logger()
    if not exports:
        return {"status": "skipped", "reason": "no exported models to put in the app"}
    try:
        rec, note = build_run_app(
            open_store(store),
            run_id,
            dataset=dataset,
            exports=exports,
            explain=explain,
            champion_uri=champion_uri,
            externals=externals,
            lungs_uri=lungs_uri,
        )
    except AppBuildUnavailable as e:
        log.warning("%s", e)
        return {"status": "skipped", "reason": str(e)}
    uri = f"runs/{run_id}/app/"
    create_markdown_artifact(
        f"App bundle of run `{run_id}`: {len(rec['models'])} models, {rec['bytes'] / 1e6:.1f} MB, "
        f"guard: {'yes' if rec['guard'] else 'no (' + str(note) + ')'}, lung outline: "
        f"{'yes' if rec.get('lungs') else 'no'}. Serve it with `make app`.",
        key="app-bundle",
    )
    log.info("app bundle written to %s (%d files)", uri, rec["files"])
    return {"status": "built", "path": uri, **{k: v for k, v in rec.items() if k != "objects"}}
