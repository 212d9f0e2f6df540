"""Accuracy benchmark: recipes trained on the shared sample's split, chosen by validation, reported on test.

Each recipe is one ``python -m covid_models.train`` run (a model plus CLI flags) in a fresh output folder and,
unless ``--shared-cache``, a fresh cache folder, so its ``train_seconds`` includes every cost a first run pays
(decoding the images, extracting features). Results accumulate in ``benchmarks/out/accuracy.json`` (a recipe
run again replaces its entry), and the table covers every recipe recorded so far.

Selection uses the validation split only: per model, among the recipes whose training time fits that model's
budget, the one with the highest ``min(val accuracy, val COVID sensitivity)`` (ties: lower val loss). The test
split is reported for the chosen recipe and is never used to choose.

Usage:
    PYTHONPATH=. .venv/bin/python benchmarks/accuracy.py --preset NAME [--preset NAME ...]
    PYTHONPATH=. .venv/bin/python benchmarks/accuracy.py --name NAME --model MODEL -- <train CLI flags>
    PYTHONPATH=. .venv/bin/python benchmarks/accuracy.py --report      # the tables of what is recorded
    PYTHONPATH=. .venv/bin/python benchmarks/accuracy.py --list        # the presets
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    MOBILENET_V2_WEIGHTS,
    OUT_DIR,
    machine_info,
    machine_line,
    prepare_split,
    quiet_tensorflow,
    run_training,
    train_command,
    write_json,
)

OUT_JSON = OUT_DIR / "accuracy.json"
WORK = OUT_DIR / "accuracy"
WEIGHTS = str(MOBILENET_V2_WEIGHTS)

# Targets on the test split of the chosen recipe, and training-time budgets (train_seconds), per model.
TARGETS: dict[str, dict[str, float]] = {
    "mobilenet_v2": {"accuracy": 0.93, "covid_sensitivity": 0.93},
    "custom_cnn": {"accuracy": 0.86},
}
BUDGET_S: dict[str, float] = {"mobilenet_v2": 20 * 60, "custom_cnn": 30 * 60}

_MNV2 = ["--input-size", "224", "--weights", WEIGHTS]
PRESETS: dict[str, tuple[str, list[str]]] = {
    # The recipe known before this benchmark: head on cached features, then the top 40 layers.
    "mnv2-head10-ft40x4": (
        "mobilenet_v2",
        [*_MNV2, "--epochs", "10", "--learning-rate", "1e-4", "--fine-tune-layers", "40", "--fine-tune-epochs", "4"],
    ),
    # A short head (an overfitted head leaves fine-tuning no gradient), then every backbone layer (BN frozen).
    "mnv2-head3-ftall8-lr1e-5": (
        "mobilenet_v2",
        [
            *_MNV2,
            *("--epochs", "3", "--learning-rate", "1e-4", "--patience", "3"),
            *("--fine-tune-layers", "1000", "--fine-tune-epochs", "8", "--fine-tune-learning-rate", "1e-5"),
        ],
    ),
    # The cpu preset's recipe (the one above with the acquisition augmentation while fine-tuning), with the
    # paper's flatten head and with the pooled head (issue 17: the phone's download; BENCHMARKS.md has the rule).
    **{
        f"mnv2-cpu-{head}": (
            "mobilenet_v2",
            [
                *_MNV2,
                *("--epochs", "3", "--learning-rate", "1e-4", "--patience", "3"),
                *("--fine-tune-layers", "1000", "--fine-tune-epochs", "8", "--fine-tune-learning-rate", "1e-5"),
                *("--fine-tune-augment", "--augment-recipe", "acquisition", "--head", head),
            ],
        )
        for head in ("flatten", "pooled")
    },
    # The same two recipes with two more seeds: three runs a head, compared on their means (BENCHMARKS.md).
    **{
        f"mnv2-cpu-{head}-seed{seed}": (
            "mobilenet_v2",
            [
                *_MNV2,
                *("--epochs", "3", "--learning-rate", "1e-4", "--patience", "3"),
                *("--fine-tune-layers", "1000", "--fine-tune-epochs", "8", "--fine-tune-learning-rate", "1e-5"),
                *("--fine-tune-augment", "--augment-recipe", "acquisition", "--head", head, "--seed", str(seed)),
            ],
        )
        for head in ("flatten", "pooled")
        for seed in (7, 2024)
    },
    # A pooled head needs more than 3 epochs at 1e-4 to fit (BENCHMARKS.md: the rule and this candidate).
    "mnv2-cpu-pooled-head10": (
        "mobilenet_v2",
        [
            *_MNV2,
            *("--epochs", "10", "--learning-rate", "1e-3", "--patience", "3"),
            *("--fine-tune-layers", "1000", "--fine-tune-epochs", "8", "--fine-tune-learning-rate", "1e-5"),
            *("--fine-tune-augment", "--augment-recipe", "acquisition", "--head", "pooled"),
        ],
    ),
    "custom-cnn-160": (
        "custom_cnn",
        ["--input-size", "160", "--epochs", "30", "--learning-rate", "1e-3", "--patience", "6"],
    ),
    "custom-cnn-128": (
        "custom_cnn",
        ["--input-size", "128", "--epochs", "30", "--learning-rate", "1e-3", "--patience", "6"],
    ),
    # The cpu preset's custom CNN at 160 px and at 128 px (two thirds of the weights: the phone's download),
    # with two more seeds (BENCHMARKS.md, "A smaller custom CNN").
    **{
        f"custom-cnn-{size}-seed{seed}": (
            "custom_cnn",
            ["--input-size", str(size), "--epochs", "30", "--learning-rate", "1e-3", "--patience", "6"]
            + ["--seed", str(seed)],
        )
        for size in (128, 160)
        for seed in (7, 2024)
    },
}


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}}


def train_one(name: str, model: str, flags: list[str], split: str, shared_cache: bool) -> dict[str, Any]:
    run_dir = WORK / name
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    cache = WORK / "shared-cache" if shared_cache else run_dir / "cache"
    if not shared_cache:
        shutil.rmtree(cache, ignore_errors=True)
    cmd = train_command(model, split, run_dir / "model", [*flags, "--cache-dir", str(cache)])
    doc = run_training(cmd, run_dir / "model", run_dir / "log.txt")
    if not shared_cache:
        shutil.rmtree(cache, ignore_errors=True)
    res = doc["result"]
    entry = {
        "name": name,
        "model": model,
        "flags": flags,
        "command": doc["command"],
        "shared_cache": shared_cache,
        "config": doc["config"],
        "train_seconds": res["train_seconds"],
        "feature_seconds": res["extra"].get("feature_seconds", 0.0),
        "wall_s": doc["wall_s"],
        "epochs": res["epochs"],
        "epochs_by_phase": {
            "head": sum(1 for h in doc["history"] if h.get("phase") != "fine-tune"),
            "fine-tune": sum(1 for h in doc["history"] if h.get("phase") == "fine-tune"),
        },
        "history": doc["history"],
        "metrics": doc["metrics"],
    }
    v = doc["metrics"]["val"]
    print(
        f"{name}: val accuracy {v['accuracy']:.4f}, val COVID sensitivity {v['covid_sensitivity']:.4f}, "
        f"val loss {v['loss']:.4f}, {res['epochs']} epochs in {res['train_seconds']:.0f}s",
        file=sys.stderr,
        flush=True,
    )
    return entry


def score(entry: dict[str, Any]) -> tuple[float, float]:
    v = entry["metrics"]["val"]
    return (min(v["accuracy"], v["covid_sensitivity"]), -v["loss"])


def choose(runs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per model, the recipe with the best validation score among those within the time budget."""
    chosen: dict[str, str] = {}
    for model in sorted({r["model"] for r in runs.values()}):
        ok = [r for r in runs.values() if r["model"] == model and r["train_seconds"] <= BUDGET_S.get(model, 1e18)]
        if ok:
            chosen[model] = max(ok, key=score)["name"]
    return chosen


def _ci(m: dict[str, Any], key: str) -> str:
    lo, hi = m[f"{key}_ci95"]
    return f"{m[key]:.4f} [{lo:.3f}, {hi:.3f}]"


def markdown(res: dict[str, Any]) -> str:
    runs = res["runs"]
    chosen = choose(runs)
    lines = [machine_line(res["machine"]), ""] if res.get("machine") else []
    lines += [
        "All recipes tried (validation split only; chosen per model by min(val accuracy, val COVID sensitivity), "
        "within the training-time budget):",
        "",
        "| recipe | model | flags | epochs (head + fine-tune) | train s | val acc | val COVID sens | val loss | "
        "val macro-F1 | chosen |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs.values():
        v = r["metrics"]["val"]
        flags = " ".join(f.replace(WEIGHTS, "<mnv2 weights>") for f in r["flags"])
        ep = r["epochs_by_phase"]
        epochs = f"{ep['head']} + {ep['fine-tune']}" if r["model"] != "custom_cnn" else str(r["epochs"])
        mark = "**yes**" if chosen.get(r["model"]) == r["name"] else ""
        lines.append(
            f"| {r['name']} | {r['model']} | `{flags}` | {epochs} | {r['train_seconds']:.0f} | {v['accuracy']:.4f} | "
            f"{v['covid_sensitivity']:.4f} | {v['loss']:.4f} | {v['macro_f1']:.4f} | {mark} |"
        )
    for model, name in chosen.items():
        r = runs[name]
        v, t = r["metrics"]["val"], r["metrics"]["test"]
        target = TARGETS.get(model, {})
        verdicts = [f"{k} {t[k]:.4f} >= {goal}: {'met' if t[k] >= goal else 'NOT met'}" for k, goal in target.items()]
        budget = BUDGET_S.get(model)
        budget_s = f"{r['train_seconds']:.0f}s of training (budget {budget / 60:.0f} min)" if budget else ""
        lines += [
            "",
            f"Chosen {model} recipe `{name}`: {budget_s}; test {', '.join(verdicts)}.",
            "",
            f"`{r['command'].replace(WEIGHTS, '../shared/weights/mobilenet_v2_1.0_224_no_top.weights.h5')}`",
            "",
            "| metric | val | test |",
            "|---|---:|---:|",
            f"| images | {v['n']} | {t['n']} |",
            f"| accuracy | {v['accuracy']:.4f} | {t['accuracy']:.4f} |",
            f"| loss | {v['loss']:.4f} | {t['loss']:.4f} |",
            f"| macro-F1 | {v['macro_f1']:.4f} | {t['macro_f1']:.4f} |",
            f"| balanced accuracy | {v['balanced_accuracy']:.4f} | {t['balanced_accuracy']:.4f} |",
            f"| ROC AUC (macro, one-vs-rest) | {v['roc_auc_macro']:.4f} | {t['roc_auc_macro']:.4f} |",
            f"| COVID sensitivity [95% CI] | {_ci(v, 'covid_sensitivity')} | {_ci(t, 'covid_sensitivity')} |",
            f"| COVID specificity [95% CI] | {_ci(v, 'covid_specificity')} | {_ci(t, 'covid_specificity')} |",
            f"| ECE (15 bins) | {v['ece']:.4f} | {t['ece']:.4f} |",
        ]
        for c in t["per_class"]:
            lines.append(f"| F1 {c} | {v['per_class'][c]['f1']:.4f} | {t['per_class'][c]['f1']:.4f} |")
        ep = r["epochs_by_phase"]
        epochs = f"| epochs (head + fine-tune) | {ep['head']} + {ep['fine-tune']} | |"
        if model == "custom_cnn":
            epochs = f"| epochs run (early stopping restores the best) | {r['epochs']} | |"
        order = ", ".join(t["per_class"])
        lines += [
            f"| training time (train_seconds) | {r['train_seconds']:.0f} s | |",
            epochs,
            f"| test confusion matrix (rows true, columns predicted: {order}) | | `{t['confusion_matrix']}` |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default=None, help="split.parquet URI (default: the shared sample's, prepared once)")
    ap.add_argument("--preset", action="append", default=[], choices=sorted(PRESETS), help="run a preset recipe")
    ap.add_argument("--name", help="name of an ad-hoc recipe (its train flags follow `--`)")
    ap.add_argument("--model", help="model of the ad-hoc recipe")
    ap.add_argument("--shared-cache", action="store_true", help="reuse one cache folder (train_seconds then lower)")
    ap.add_argument("--report", action="store_true", help="only print the tables of the recorded runs")
    ap.add_argument("--list", action="store_true", help="list the presets")
    ap.add_argument("--out", type=Path, default=OUT_JSON, help="JSON results (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.list:
        for name, (model, flags) in PRESETS.items():
            print(f"{name}: --model {model} {' '.join(flags)}")
        return
    recipes = [(p, *PRESETS[p]) for p in args.preset]
    if args.name:
        if not args.model:
            ap.error("--name needs --model")
        recipes.append((args.name, args.model, extra))
    res = load_results(args.out)
    if recipes:
        quiet_tensorflow()
        split = args.split or prepare_split()
        for name, model, flags in recipes:
            res["runs"][name] = train_one(name, model, flags, split, args.shared_cache)
            res["split"] = split
            res["machine"] = machine_info()
            res["chosen"] = choose(res["runs"])
            write_json(res, args.out)  # after every run: a later failure keeps the earlier ones
    elif not args.report:
        ap.error("nothing to do: give --preset, --name/--model, --report or --list")
    if res["runs"]:
        print(markdown(res))


if __name__ == "__main__":
    main()
