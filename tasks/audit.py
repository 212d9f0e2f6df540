"""The shortcut audit's task, a thin wrapper over ``covid_eval.shortcut_audit_unit``, and the retrain
flow's audit stage: the lung segmenter (trained or reused), then the audit of the run's split.

An audit is for people, as Grad-CAM is: a failure (no weights, a bad mask source) is recorded, shown in
the report, and never stops the run.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from covid_eval.shortcut_audit import AuditConfig, report_lines
from covid_eval.shortcut_audit_unit import audit_split
from tasks.logs import task_logger
from tasks.segmenter import train_segmenter


@task(name="shortcut-audit")
def shortcut_audit(
    split_uri: str,
    segmenter_uri: str,
    config: dict[str, Any] | None = None,
    max_per_class: int | None = None,
) -> dict[str, Any]:
    """The audit of ``split_uri`` with the segmenter unit at ``segmenter_uri`` (computed once per
    split, segmenter and recipe; stored beside the dataset version); its figures become an artifact."""
    rec = audit_split(split_uri, segmenter_uri, AuditConfig.from_dict(config), max_per_class=max_per_class)
    m = rec["masked"]
    task_logger(__name__).info(
        "shortcut audit %s (%s): accuracy %.3f [%.3f, %.3f] with the lungs blacked out, %.3f whole; %s",
        rec["uri"],
        rec["status"],
        m["accuracy"],
        *m["accuracy_ci95"],
        rec["unmasked"]["accuracy"],
        rec["meaning"],
    )
    create_markdown_artifact(
        "\n".join(report_lines(rec)).strip(), key="shortcut-audit", description="the data's shortcut audit"
    )
    return rec


def audit_data(
    masks: str | None,
    store: str,
    split_uri: str,
    segmenter: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    max_per_class: int | None = None,
) -> dict[str, Any] | None:
    """The retrain flow's audit stage (``data.lung_masks``): None when no mask source is named; else
    the audit's record, or ``{"status": "failed", "reason"}`` when the segmenter or the audit failed; with
    ``segmenter_uri``, the segmenter unit as this store names it now (for the Grad-CAM shortcut score), whenever
    the segmenter is complete."""
    if not masks:
        return None
    seg = train_segmenter(masks, store, segmenter, return_state=True)
    if not seg.is_completed():
        return {"status": "failed", "reason": f"the lung segmenter on {masks} failed: {seg.message}"}
    lungs = seg.result()["uri"]
    state = shortcut_audit(split_uri, lungs, audit, max_per_class, return_state=True)
    if not state.is_completed():
        return {"status": "failed", "reason": f"the shortcut audit failed: {state.message}", "segmenter_uri": lungs}
    return {**state.result(), "segmenter_uri": lungs}
