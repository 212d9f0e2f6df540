"""Great Expectations 1.x suite over the manifest.

What is checked (each expectation names what it guards in its ``meta``):

* exactly the four classes, each present (under ``missing_classes="allow"``, the ``external``
  profile for someone else's labelled set: no class other than the four, and a class may be absent);
  under ``kind="negative"`` (the ``negative`` profile, a set known to hold no COVID: see
  ``covid_data.negative``), every image is labelled "not COVID" and names its finding folder;
* per-class image counts within the profile's bounds;
* every file decodes as an image (``error`` is null); under the ``exclude`` policy a small
  fraction may fail, and those files are listed and left out of the split;
* image dimensions as expected (a mismatch warns or fails, as configured);
* no content (sha256) appears under two labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pandas as pd

from covid_data.labels import CLASSES, NEGATIVE_LABEL

log = logging.getLogger(__name__)

KAGGLE_COUNTS = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
SHARED_SAMPLE_COUNTS = {"COVID": 1000, "Lung_Opacity": 962, "Normal": 1000, "Viral Pneumonia": 835}


class DataValidationError(RuntimeError):
    """The manifest failed a critical expectation."""


@dataclass(frozen=True)
class ValidationConfig:
    class_bounds: dict[str, tuple[int, int]]
    image_size: tuple[int, int] | None = (299, 299)
    size_mismatch: Literal["warn", "fail"] = "fail"
    unreadable: Literal["exclude", "fail"] = "exclude"
    # Under "exclude": more undecodable files than this fraction still fails the run.
    max_unreadable_fraction: float = 0.01
    # "allow": a class with no images passes (and is reported); for external evaluation sets.
    missing_classes: Literal["fail", "allow"] = "fail"
    # "negative": a set known to hold no COVID, in finding folders (covid_data.negative).
    kind: Literal["labelled", "negative"] = "labelled"

    @classmethod
    def around(cls, counts: dict[str, int], tolerance: float, **kw: Any) -> ValidationConfig:
        bounds = {k: (int(v * (1 - tolerance)), int(v * (1 + tolerance) + 0.999)) for k, v in counts.items()}
        return cls(class_bounds=bounds, **kw)

    def fingerprint(self) -> str:
        d = asdict(self)
        if d["missing_classes"] == "fail":  # the default leaves the fingerprints of earlier profiles as they were
            del d["missing_classes"]
        if d["kind"] == "labelled":  # likewise
            del d["kind"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


PROFILES: dict[str, ValidationConfig] = {
    # The Kaggle release (v5); later releases may add images, hence the tolerance.
    "kaggle": ValidationConfig.around(KAGGLE_COUNTS, 0.10),
    # ../shared/data/covid19-radiography-sample
    "shared-sample": ValidationConfig.around(SHARED_SAMPLE_COUNTS, 0.02),
    # Any non-empty class: for seeded sub-samples and experiments.
    "any": ValidationConfig(class_bounds={c: (1, 10**9) for c in CLASSES}),
    # Someone else's labelled set, scored by `python -m flows.evaluate`: any size, any class may be
    # absent (reported), unknown class folders and undecodable files are reported and left out.
    "external": ValidationConfig(
        class_bounds={c: (0, 10**9) for c in CLASSES},
        image_size=None,
        max_unreadable_fraction=1.0,
        missing_classes="allow",
    ),
    # A negative set (`--negative`): any finding folders, any size; undecodable files reported, left out.
    "negative": ValidationConfig(
        class_bounds={NEGATIVE_LABEL: (1, 10**9)},
        image_size=None,
        max_unreadable_fraction=1.0,
        missing_classes="allow",
        kind="negative",
    ),
}


def get_profile(name: str, **overrides: Any) -> ValidationConfig:
    try:
        base = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown validation profile {name!r}; choose from {sorted(PROFILES)}") from None
    return ValidationConfig(**{**asdict(base), **overrides}) if overrides else base


@dataclass
class Finding:
    expectation: str
    description: str
    severity: Literal["critical", "warning"]
    success: bool
    observed: Any = None
    examples: list[str] = field(default_factory=list)  # offending paths (first few)
    unexpected_count: int = 0


@dataclass
class ValidationReport:
    success: bool
    findings: list[Finding]
    excluded: list[dict[str, str]]  # [{"path":..., "error":...}] left out of the split
    class_counts: dict[str, int]
    profile: dict[str, Any]
    ge_result: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.success and f.severity == "critical"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.success and f.severity == "warning"]

    def failure_message(self, where: str) -> str:
        lines = [f"data validation failed for {where}:"]
        for f in self.failures:
            ex = f" e.g. {', '.join(f.examples[:5])}" if f.examples else ""
            lines.append(f"  - {f.description}: observed {f.observed}{ex}")
        return "\n".join(lines)

    def summary_markdown(self, where: str) -> str:
        status = "PASSED" if self.success else "FAILED"
        out = [f"# Data validation {status}", "", f"Dataset: `{where}`", "", "| class | images |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in sorted(self.class_counts.items())]
        out += ["", "| check | severity | result | observed |", "|---|---|---|---|"]
        for f in self.findings:
            res = "ok" if f.success else ("**FAIL**" if f.severity == "critical" else "warn")
            obs = str(f.observed).replace("|", "\\|")
            out.append(f"| {f.description} | {f.severity} | {res} | {obs} |")
        problems = [f for f in self.findings if not f.success]
        for f in problems:
            if f.examples:
                out += ["", f"**{f.description}** ({f.unexpected_count} rows), first offenders:", ""]
                out += [f"- `{p}`" for p in f.examples[:20]]
        if self.excluded:
            out += ["", f"**Excluded from the split ({len(self.excluded)} unreadable files):**", ""]
            out += [f"- `{e['path']}`: {e['error']}" for e in self.excluded[:50]]
        return "\n".join(out) + "\n"

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, default=str, sort_keys=True)


def _class_expectation(E: Any, cfg: ValidationConfig) -> tuple[Any, str, str]:
    """The labelled profiles' first check: the four classes (a class may be absent where allowed)."""
    if cfg.missing_classes == "fail":
        return (
            E.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=list(CLASSES)),
            "exactly the four classes, each present",
            "critical",
        )
    return (
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(CLASSES)),
        "only the four classes (a class may be absent; other class folders are left out)",
        "warning",
    )


def _expectations(cfg: ValidationConfig, n_rows: int) -> list[tuple[Any, str, str]]:
    """(expectation, description, severity) in the suite's order."""
    import great_expectations as gx

    E = gx.expectations
    if cfg.kind == "negative":
        items: list[tuple[Any, str, str]] = [
            (
                E.ExpectColumnValuesToBeInSet(column="label", value_set=[NEGATIVE_LABEL]),
                f"every image labelled {NEGATIVE_LABEL!r} (a negative set)",
                "critical",
            ),
            (E.ExpectColumnValuesToNotBeNull(column="finding"), "every image in a finding folder", "critical"),
        ]
    else:
        items = [_class_expectation(E, cfg)]
    for label, (lo, hi) in sorted(cfg.class_bounds.items()):
        items.append(
            (
                E.ExpectTableRowCountToBeBetween(
                    min_value=lo,
                    max_value=hi,
                    row_condition=f'label=="{label}"',
                    condition_parser="pandas",
                ),
                f"{label} images between {lo} and {hi}",
                "critical",
            )
        )
    mostly = 1.0 if cfg.unreadable == "fail" else max(0.0, 1.0 - cfg.max_unreadable_fraction)
    items.append(
        (
            E.ExpectColumnValuesToBeNull(column="error", mostly=mostly),
            "every file decodes as an image"
            + ("" if cfg.unreadable == "fail" else f" (up to {cfg.max_unreadable_fraction:.0%} excluded)"),
            "critical",
        )
    )
    if cfg.image_size:
        w, h = cfg.image_size
        sev = "critical" if cfg.size_mismatch == "fail" else "warning"
        items.append((E.ExpectColumnValuesToBeBetween(column="width", min_value=w, max_value=w), f"width {w}", sev))
        items.append((E.ExpectColumnValuesToBeBetween(column="height", min_value=h, max_value=h), f"height {h}", sev))
    items.append(
        (
            E.ExpectColumnValuesToBeBetween(column="labels_per_content", max_value=1),
            "no image (same sha256) under two labels",
            "critical",
        )
    )
    return items


def validate_manifest(manifest: pd.DataFrame, cfg: ValidationConfig) -> ValidationReport:
    """Run the suite over the manifest and collect a report (does not raise)."""
    import great_expectations as gx

    df = manifest.copy()
    df["width"] = df["width"].astype("float64")  # GE's comparisons want plain numerics
    df["height"] = df["height"].astype("float64")
    df["labels_per_content"] = df.groupby("sha256", dropna=True)["label"].transform("nunique").fillna(1)
    df["labels_per_content"] = df["labels_per_content"].astype("int64")

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # keep task logs readable
    batch_def = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = gx.ExpectationSuite(name="covid-radiography-manifest")
    described = _expectations(cfg, len(df))
    for exp, desc, sev in described:
        exp.meta = {"description": desc, "severity": sev}
        suite.add_expectation(exp)
    suite = context.suites.add(suite)
    vd = context.validation_definitions.add(gx.ValidationDefinition(name="manifest", data=batch_def, suite=suite))
    result = vd.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
    )

    findings = []
    for r in result.results:
        meta = r.expectation_config.meta or {}
        res = r.result or {}
        examples = [
            str(i.get("path")) if isinstance(i, dict) else str(i) for i in (res.get("unexpected_index_list") or [])
        ]
        observed = res.get("observed_value")
        if observed is None and "unexpected_count" in res:
            observed = f"{res['unexpected_count']} offending rows"
        if r.expectation_config.type in (
            "expect_column_distinct_values_to_equal_set",
            "expect_column_values_to_be_in_set",
        ):
            allowed = [NEGATIVE_LABEL] if cfg.kind == "negative" else list(CLASSES)
            present = sorted(map(str, df["label"].unique()))
            unknown = df[~df["label"].isin(allowed)]
            observed = (
                f"classes {present}; missing {sorted(set(allowed) - set(present))}; "
                f"unexpected {sorted(map(str, unknown['label'].unique()))}"
            )
            examples = list(unknown["path"].head(50))
            res = {**res, "unexpected_count": len(unknown)}
        if r.exception_info and r.exception_info.get("raised_exception"):
            observed = f"expectation raised: {r.exception_info.get('exception_message')}"
        findings.append(
            Finding(
                expectation=r.expectation_config.type,
                description=meta.get("description", r.expectation_config.type),
                severity=meta.get("severity", "critical"),
                success=bool(r.success),
                observed=observed,
                examples=examples[:50],
                unexpected_count=int(res.get("unexpected_count") or 0),
            )
        )
    bad = manifest[manifest["error"].notna()]
    excluded = [{"path": p, "error": e} for p, e in zip(bad["path"], bad["error"], strict=True)]
    # A negative set's images are counted by finding folder (its one label says little).
    by = "finding" if cfg.kind == "negative" and "finding" in manifest.columns else "label"
    counts = {str(k): int(v) for k, v in manifest[by].value_counts().sort_index().items()}
    report = ValidationReport(
        success=not any(not f.success and f.severity == "critical" for f in findings),
        findings=findings,
        excluded=excluded,
        class_counts=counts,
        profile=asdict(cfg),
        ge_result=result.to_json_dict(),
    )
    return report
