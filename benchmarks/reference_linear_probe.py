"""Quality bar: our `logistic` head's test accuracy vs a plain, hand-written reference linear probe.

    .venv/bin/python benchmarks/reference_linear_probe.py      (from the repo root, after `make run`)

The reference is what a user would write without this pipeline, on the SAME split (data/prepared/manifest.csv)
and backbone (models/backbone/meta.json): torchvision `get_model(arch, weights=...)` with its last module
(`classifier`, `fc` or `heads`) replaced by identity, `weights.transforms()`, a DataLoader with 2 workers,
eval mode + inference_mode on CPU; then StandardScaler fitted on train + LogisticRegression for each C of the
first `type: logistic` head in params.yaml, C chosen by val accuracy, test accuracy of that model.
Ours is that head's accuracy in metrics/evaluate.json (written by `dvc repro`). Target: within 1 point.
Both sides see the same images (every row of the manifest) and the same split; accuracy is deterministic for a
given set of features (seeded), so one run of each side is the measurement; the eager pass's seconds are printed
for information only.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
SEED = 0


def logistic_head() -> tuple[str, dict]:
    heads = (yaml.safe_load((REPO / "params.yaml").read_text()) or {}).get("heads") or {}
    for name, spec in heads.items():
        if (spec or {}).get("type") == "logistic":
            return name, spec
    raise SystemExit("params.yaml: no head with `type: logistic`")


def reference_model() -> tuple[torch.nn.Module, object]:
    """The torchvision backbone of meta.json, its classifier replaced by identity, and its preprocessing."""
    meta = json.loads((REPO / "models/backbone/meta.json").read_text())
    options = torchvision.models.get_model_weights(meta["arch"])
    weights = None if str(meta["weights"]).lower() == "none" else options[meta["weights"]]
    torch.manual_seed(SEED)
    model = torchvision.models.get_model(meta["arch"], weights=weights)
    last = next((name for name in ("classifier", "fc", "heads") if hasattr(model, name)), None)
    if last is None:
        raise SystemExit(f"{meta['arch']}: no .classifier, .fc or .heads to replace by identity")
    setattr(model, last, torch.nn.Identity())
    return model.eval(), (weights or options.DEFAULT).transforms()


class Images(Dataset):
    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(REPO / self.paths[i]).convert("RGB"))


def features(model: torch.nn.Module, transform, paths: list[str]) -> tuple[np.ndarray, float]:
    loader = DataLoader(Images(paths, transform), batch_size=64, num_workers=2, shuffle=False)
    chunks = []
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(loader, desc="eager extract", unit="batch"):
            chunks.append(model(batch).flatten(1).numpy())
    return np.concatenate(chunks), time.perf_counter() - started


def main() -> None:
    rows = list(csv.DictReader((REPO / "data/prepared/manifest.csv").open(newline="")))
    classes = json.loads((REPO / "data/prepared/classes.json").read_text())
    head, spec = logistic_head()
    cs, max_iter = [float(c) for c in spec.get("C", [0.001, 0.01, 0.1, 1, 10, 100])], spec.get("max_iter", 1000)

    model, transform = reference_model()
    x, seconds = features(model, transform, [r["path"] for r in rows])
    y = np.array([classes.index(r["label"]) for r in rows])
    split = np.array([r["split"] for r in rows])
    counts = {s: int((split == s).sum()) for s in ("train", "val", "test")}

    scaler = StandardScaler().fit(x[split == "train"])
    data = {s: (scaler.transform(x[split == s]), y[split == s]) for s in counts}
    val_accuracy = {}
    for c in cs:
        probe = LogisticRegression(C=c, max_iter=max_iter, class_weight=spec.get("class_weight"),
                                   random_state=SEED).fit(*data["train"])
        val_accuracy[c] = probe.score(*data["val"])
    best = max(cs, key=lambda c: val_accuracy[c])  # the first (smallest) C on ties
    probe = LogisticRegression(C=best, max_iter=max_iter, class_weight=spec.get("class_weight"),
                               random_state=SEED).fit(*data["train"])
    reference = probe.score(*data["test"])

    print(f"images: {len(rows)} ({', '.join(f'{s} {n}' for s, n in counts.items())}); {len(classes)} classes; "
          f"features {x.shape[1]}-d")
    print(f"eager feature extraction: {seconds:.1f} s ({len(rows) / seconds:.1f} img/s, CPU, 2 workers; one pass, "
          "not a speed comparison: benchmarks/extract_throughput.py is)")
    print(f"reference probe: C = {best:g} (val accuracy {val_accuracy[best]:.4f}), "
          f"test accuracy {reference:.4f}")
    print("  val accuracy per C: " + ", ".join(f"{c:g}: {a:.4f}" for c, a in val_accuracy.items()))
    metrics = REPO / "metrics/evaluate.json"
    ours = json.loads(metrics.read_text()).get(head, {}).get("accuracy") if metrics.exists() else None
    if ours is None:
        print(f"ours ({head}): no accuracy for {head!r} in {metrics.relative_to(REPO)}: run `dvc repro` first")
        return
    difference = 100 * (ours - reference)
    extract = json.loads((REPO / "metrics/extract.json").read_text())
    print(f"ours ({head}): test accuracy {ours:.4f} (features by ONNX Runtime on {extract['provider']}"
          + ("" if extract["provider"] == "CPUExecutionProvider" else
             "; CUDA rows agree with CPU rows within 1e-3 of the largest feature, tests/test_extract.py") + ")")
    print(f"difference (ours - reference): {difference:+.2f} points  "
          f"({'within' if abs(difference) <= 1 else 'OUTSIDE'} the 1-point bar)")


if __name__ == "__main__":
    main()
