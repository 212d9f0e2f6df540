"""Task that explains the top models: Grad-CAM galleries and shortcut scores into the run folder.

A thin wrapper over covid_eval.gallery. Its PNGs go to ``runs/<run id>/gradcam/<model>/`` (with
``gradcam.json``, the full record); the run folder is completed later by ``run.json``, so writing
before it is fine, and a rerun of an incomplete run replaces them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from covid_eval.gallery import explain_model, write_index
from covid_eval.gradcam import BORDER
from covid_registry.run_folder import run_unit
from tasks.logs import task_logger


def _logger():
    return task_logger(__name__)


def _summary(model: str, res: dict[str, Any]) -> dict[str, Any]:
    """The small record the flow, the report, the model card and the app use."""
    folder = f"gradcam/{model}"
    return {
        "model": model,
        "shortcut_score": res["shortcut_score"],
        "baseline": res["baseline"],
        "method": res["method"],
        "n": res["n"],
        "layer": res["layer"],
        "images": [f"{folder}/{g['file']}" for g in res["gallery"]],
        "gallery": [
            {k: g[k] for k in ("file", "true", "predicted", "probability", "correct", "shortcut")}
            for g in res["gallery"]
        ],
    }


@task(name="explain-models")
def explain_models(
    store: str,
    run_id: str,
    split_uri: str,
    top: list[dict[str, Any]],
    *,
    per_class: int = 2,
    seed: int = 0,
    pool_per_class: int = 32,
    max_per_class: int | None = None,
    border: float = BORDER,
    segmenter_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Per top model (records with ``model`` and ``out``, its slot URI): the Grad-CAM gallery
    into the run folder and the shortcut score.

    The shortcut score is over the dataset's lung masks, else over the masks of the lung segmenter unit at
    ``segmenter_uri`` (the run's, with ``data.lung_masks``), else over the border band.

    Returns ``{model, shortcut_score, baseline, method ("lung masks" | "segmenter lung masks" | "border band
    10%"), n,
    layer, images: [paths relative to the run folder], gallery: [per-image records]}`` per
    model; a model whose explanation fails gets ``{model, error}`` and the others go on (an
    explanation never fails the run).
    """
    logger = _logger()
    unit = run_unit(store, run_id)
    if unit.is_complete():  # a finished run is never written again: its stored records
        return (unit.record() or {}).get("explain") or []
    out: list[dict[str, Any]] = []
    for r in top:
        model = r["model"]
        try:
            with tempfile.TemporaryDirectory(prefix=f"gradcam-{model}-") as tmp:
                res = explain_model(
                    r["out"],
                    split_uri,
                    Path(tmp),
                    per_class=per_class,
                    seed=seed,
                    pool_per_class=pool_per_class,
                    max_per_class=max_per_class,
                    border=border,
                    segmenter_uri=segmenter_uri,
                )
                write_index(Path(tmp), res)
                for f in sorted(Path(tmp).iterdir()):
                    unit.put_file(f"gradcam/{model}/{f.name}", f)
            rec = _summary(model, res)
            logger.info(
                "%s: shortcut score %s (uniform map %.2f, %s) over %d images, layer %s; %d gallery images",
                model,
                "-" if rec["shortcut_score"] is None else f"{rec['shortcut_score']:.2f}",
                rec["baseline"],
                rec["method"],
                rec["n"],
                rec["layer"],
                len(rec["images"]),
            )
        except Exception as e:  # an explanation is for people; it never stops a run
            logger.error("Grad-CAM of %s failed: %s", model, e, exc_info=True)
            rec = {"model": model, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        out.append(rec)
    return out
