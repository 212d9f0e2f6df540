"""The lung segmenter's task: a thin wrapper over ``covid_eval.segmenter_unit``."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from covid_eval.segmenter_unit import SegmenterConfig, train_segmenter_unit


@task(name="train-segmenter", retries=1, retry_delay_seconds=10)
def train_segmenter(masks: str, store: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or reuse) the segmenter unit of ``masks`` in ``store``; its card becomes an artifact.

    One retry: the unit is incomplete after a failure, so the retry resumes the training from its
    last epoch and replaces what the failed attempt wrote."""
    logger = get_run_logger()
    cfg = SegmenterConfig.from_dict(config)
    rec = train_segmenter_unit(masks, store, cfg)
    m = rec["heldout_metrics"]
    logger.info(
        "segmenter %s (%s): held-out Dice %.4f [%.4f, %.4f], IoU %.4f [%.4f, %.4f]; TFLite %.2f MB",
        rec["uri"],
        rec["status"],
        m["dice"],
        *m["dice_ci95"],
        m["iou"],
        *m["iou_ci95"],
        rec["tflite"]["bytes"] / 1e6,
    )
    create_markdown_artifact(
        f"Lung segmenter `{rec['uri']}` ({rec['status']}): held-out Dice **{m['dice']:.3f}** "
        f"(95% CI {m['dice_ci95'][0]:.3f}-{m['dice_ci95'][1]:.3f}), IoU {m['iou']:.3f} "
        f"(95% CI {m['iou_ci95'][0]:.3f}-{m['iou_ci95'][1]:.3f}) on {m['images']} held-out masks; "
        f"TFLite {rec['tflite']['bytes'] / 1e6:.2f} MB. Another hospital's masks: not measured.",
        key="lung-segmenter",
        description="the lung segmenter unit",
    )
    return rec
