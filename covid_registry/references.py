"""What a user may call a model: ``champion``, ``<run id>/<model>`` or a model slot URI."""

from __future__ import annotations

import re

from covid_data.store import open_store
from covid_eval.external import EvaluationError, ModelRef, model_ref
from covid_registry.champion import current
from covid_registry.run_folder import run_unit

_RUN_REF = re.compile(r"[^/:]+/[^/:]+")


def resolve_model(reference: str, store: str) -> ModelRef:
    """``champion``, ``<run id>/<model>`` or a model slot URI -> the complete slot it names."""
    ref = str(reference).strip()
    st = open_store(store)
    if ref == "champion":
        rec = current(st)
        if rec is None:
            raise EvaluationError(
                f"the store {st.uri} has no champion (no champion.json): name the model as <run id>/<model> "
                "or by its model slot URI"
            )
        if not rec.get("model_uri"):
            raise EvaluationError(f"{st.uri_for('champion.json')} names no model_uri")
        found = model_ref(rec["model_uri"], f"the champion of {st.uri}")
        return ModelRef(**{**found.to_dict(), "reference": ref, "run_id": rec.get("run_id")})
    run_hint = ""
    if _RUN_REF.fullmatch(ref):
        run_id, name = ref.split("/")
        unit = run_unit(st.uri, run_id)
        rec = unit.record()
        if rec is not None:
            records = [r for r in rec.get("records") or [] if r.get("model") == name]
            if not records:
                have = sorted({str(r.get("model")) for r in rec.get("records") or []})
                raise EvaluationError(f"run {run_id} in {st.uri} has no model {name!r}; its models: {have}")
            r = records[0]
            if r.get("status") not in ("trained", "cached") or not r.get("out"):
                raise EvaluationError(
                    f"model {name} of run {run_id} has no trained model (status {r.get('status')!r}: "
                    f"{r.get('reason') or r.get('error') or 'no slot'})"
                )
            found = model_ref(r["out"], f"model {name} of run {run_id}")
            return ModelRef(**{**found.to_dict(), "reference": ref, "run_id": run_id})
        if st.list(f"runs/{run_id}/"):
            raise EvaluationError(f"run {run_id} in {st.uri} is incomplete (no runs/{run_id}/run.json)")
        run_hint = f"not a run of {st.uri} (no runs/{run_id}/run.json) and "
    try:
        slot_store = open_store(ref)
        exists = bool(slot_store.exists("metrics.json") or slot_store.list())
    except (ValueError, OSError):
        exists = False
    if not exists:
        raise EvaluationError(
            f"unknown model reference {ref!r}: not 'champion', {run_hint}not a model slot "
            "(no metrics.json there); use champion, <run id>/<model> or a model slot URI"
        )
    return model_ref(ref, f"model {ref}")
