"""The strategy advisor: how much data there is, how close it is to the pretraining domain, hence how much of
the backbone to fine-tune (the four quadrants of cs231n's transfer-learning notes and the Keras guide).

Similarity is measured with the pretraining data's own statistics, which every BatchNorm layer keeps: its
running mean and variance per channel are the statistics of that layer's input over the pretraining data. The
user's images go through the pretrained model, and per BN layer and channel the Gaussian of their activations
is compared with the running one (KL divergence); the **BN shift** is the median over layers of the per-layer
mean over channels. 0 means the network's activations look as on its pretraining data, at every depth.
For an architecture without BatchNorm statistics (ViT, Swin, ConvNeXt use LayerNorm) the fallback is the
pretrained classifier's mean top-1 softmax confidence over its pretraining classes. Both are computed whenever
they can be, in one forward pass; the decision uses one of them, and says which.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from transfer_learning.common.errors import UserError
from transfer_learning.data.decode import BadImage
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.manifest import Row, read_bit_depth
from transfer_learning.data.pixels import evaluation_inputs
from transfer_learning.params import AdviseParams

ADVICE = Path("metrics/advice.json")
BATCH_SIZE = 32
RERUN = "run `dvc repro advise`"

# (size, domain) -> (strategy, unfreeze); "partial" is advise.partial_unfreeze
STRATEGIES: dict[tuple[str, str], tuple[str, int | str]] = {
    ("small", "similar"): ("frozen_features", 0),
    ("small", "different"): ("partial_finetune", "partial"),
    ("large", "similar"): ("full_finetune", "all"),
    ("large", "different"): ("from_scratch", "all"),
}
PARAM_KEYS = {"large_per_class": "advise.large_per_class", "bn_shift": "advise.similar_shift",
              "top1_confidence": "advise.similar_confidence", "partial_unfreeze": "advise.partial_unfreeze"}


@dataclass(frozen=True)
class Measurement:
    """What the pretrained model says about a sample of the user's images."""

    images: int
    bn_shift: float | None  # None when the model keeps no BatchNorm running statistics
    bn_layers: int
    top1_confidence: float  # mean over images of the largest softmax probability over the pretraining classes
    entropy: float  # mean softmax entropy / log(number of pretraining classes): 0 certain, 1 uniform
    seconds: float


# --- measuring -----------------------------------------------------------------------------------------------

class _BatchNormInputs:
    """Per-channel count, sum and sum of squares of every BatchNorm layer's input, over all the batches run."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
        self.sums: dict[int, list] = {id(m): [0, 0.0, 0.0] for m in self.layers}  # count, sum, sum of squares

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        per_image = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)  # N x C x positions
        # per image and channel in float32 (contiguous reductions; a norm instead of materialising x*x: the
        # hooks then add about a third to the forward instead of doubling it), summed over images in float64
        acc = self.sums[id(module)]
        acc[0] += per_image.shape[0] * per_image.shape[2]
        acc[1] = acc[1] + per_image.sum(2).double().sum(0)
        acc[2] = acc[2] + torch.linalg.vector_norm(per_image, 2, 2).double().square().sum(0)

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def shift(self) -> float | None:
        """Median over layers of the mean over channels of KL(N(data mean, data var) || N(running mean, var))."""
        if not self.layers:
            return None
        per_layer = []
        for m in self.layers:
            n, total, squares = self.sums[id(m)]
            mean = total / n
            var = (squares / n - mean * mean).clamp_min(0) + m.eps  # BN itself adds eps to both
            run_mean, run_var = m.running_mean.double(), m.running_var.double() + m.eps
            ratio = var / run_var
            kl = 0.5 * (ratio + (mean - run_mean) ** 2 / run_var - 1 - torch.log(ratio))
            per_layer.append(float(kl.mean()))
        return float(median(per_layer))


def sample_rows(rows: Sequence[Row], size: int, seed: int) -> list[Row]:
    """A seeded choice of `size` rows (all of them when there are fewer), in manifest order."""
    if len(rows) <= size:
        return list(rows)
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size, replace=False))
    return [rows[i] for i in chosen]


def _batches(paths: Sequence[Path], preprocessing: Preprocessing) -> Iterator[torch.Tensor]:
    """Normalized batches: the evaluation preprocessing of every stage (data/pixels.py)."""
    for start in range(0, len(paths), BATCH_SIZE):
        inputs = []
        for path in paths[start:start + BATCH_SIZE]:
            try:
                inputs.append(evaluation_inputs([path.read_bytes()], preprocessing))
            except (OSError, BadImage) as error:
                raise UserError(f"{path}: cannot be read since `prepare` ({error}); "
                                "run `dvc repro -f -s prepare` and then `dvc repro`") from None
        yield torch.from_numpy(np.concatenate(inputs))


def measure(model: nn.Module, preprocessing: Preprocessing, paths: Sequence[Path]) -> Measurement:
    """Run the full pretrained classifier (eval mode, CUDA when there is one) over the images at `paths`, decoded
    by the prepared data's rule for high-bit images (data/prepared/decoding.json), as every stage decodes them."""
    preprocessing = preprocessing.with_bit_depth(read_bit_depth())
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.eval().to(device)
    inputs = _BatchNormInputs(model)
    top1: list[torch.Tensor] = []
    entropy: list[torch.Tensor] = []
    with torch.inference_mode(), inputs.recording():
        bar = tqdm(total=len(paths), desc="advise", unit="img", disable=len(paths) <= BATCH_SIZE)
        for batch in _batches(paths, preprocessing):
            probabilities = model(batch.to(device)).float().softmax(1)
            top1.append(probabilities.max(1).values.cpu())
            entropy.append(-(probabilities * probabilities.clamp_min(1e-12).log()).sum(1).cpu()
                           / math.log(probabilities.shape[1]))
            bar.update(len(batch))
        bar.close()
    return Measurement(
        images=len(paths),
        bn_shift=inputs.shift(),
        bn_layers=len(inputs.layers),
        top1_confidence=float(torch.cat(top1).mean()),
        entropy=float(torch.cat(entropy).mean()),
        seconds=time.perf_counter() - started,
    )


# --- deciding ------------------------------------------------------------------------------------------------

def images_per_class(rows: Sequence[Row], classes: Sequence[str]) -> dict[str, int]:
    counts = {name: 0 for name in classes}
    for row in rows:
        if row.split == "train":
            counts[row.label] = counts.get(row.label, 0) + 1
    return counts


def similarity(measured: Measurement, params: AdviseParams) -> dict[str, Any]:
    """The measure the decision uses (BN shift when there is one, else top-1 confidence), its threshold and
    verdict, and everything measured."""
    if measured.bn_shift is not None:
        name, value, threshold, rule = "bn_shift", measured.bn_shift, params.similar_shift, "<="
        similar = value <= threshold
        how = (f"median over the backbone's {measured.bn_layers} BatchNorm layers of the mean per-channel KL "
               "divergence of the images' activations from the layer's running statistics (the pretraining data's)")
    else:
        name, value, threshold, rule = "top1_confidence", measured.top1_confidence, params.similar_confidence, ">="
        similar = value >= threshold
        how = ("mean top-1 softmax probability of the pretrained classifier over its pretraining classes "
               "(the backbone keeps no BatchNorm statistics)")
    return {
        "measure": name, "value": round(value, 4), "rule": rule, "threshold": threshold, "param": PARAM_KEYS[name],
        "similar": similar, "how": how, "images": measured.images, "sample": params.sample, "seed": params.seed,
        "bn_shift": None if measured.bn_shift is None else round(measured.bn_shift, 4),
        "bn_layers": measured.bn_layers, "top1_confidence": round(measured.top1_confidence, 4),
        "entropy": round(measured.entropy, 4),  # no timing: the same data and params give the same file
    }


def quadrant(size: str, domain: str) -> tuple[str, int | str]:
    """(strategy, unfreeze) for a quadrant; unfreeze "partial" stands for advise.partial_unfreeze."""
    return STRATEGIES[(size, domain)]


def advise(counts: dict[str, int], measured: Measurement | None, params: AdviseParams, weights: str | None,
           blocks: Sequence[str]) -> dict[str, Any]:
    """Everything metrics/advice.json holds. `measured` is None for a random init (`weights` None)."""
    per_class = float(median(counts.values())) if counts else 0.0
    size = "large" if per_class >= params.large_per_class else "small"
    if weights is None:
        similar, domain = None, "different"  # no pretraining domain: nothing to be similar to
        strategy, unfreeze = "from_scratch", "all"  # and no pretrained weights worth freezing
    else:
        if measured is None:
            raise ValueError("pretrained weights need a measurement")
        similar = similarity(measured, params)
        domain = "similar" if similar["similar"] else "different"
        strategy, unfreeze = quadrant(size, domain)
    if unfreeze == "partial":
        unfreeze = min(params.partial_unfreeze, len(blocks))
    return {
        "images_per_class": {"train": counts, "median": per_class, "min": min(counts.values(), default=0),
                             "max": max(counts.values(), default=0)},
        "size": size,
        "large_per_class": params.large_per_class,
        "weights": weights,
        "similarity": similar,
        "domain": domain,
        "quadrant": f"{size}-{domain}",
        "strategy": strategy,
        "unfreeze": unfreeze,
        "unfrozen_blocks": _unfrozen(blocks, unfreeze),
        "blocks": len(blocks),
    }


def _unfrozen(blocks: Sequence[str], unfreeze: int | str) -> list[str]:
    if unfreeze == "all":
        return list(blocks)
    return list(blocks[len(blocks) - int(unfreeze):]) if unfreeze else []


def recommended_unfreeze(path: Path = ADVICE) -> int | str:
    """The advisor's `unfreeze` (0, k or "all"), for `finetune.unfreeze: auto`."""
    if not path.is_file():
        raise UserError(f"finetune.unfreeze: auto follows the strategy advisor, but {path} does not exist: {RERUN}")
    try:
        unfreeze = json.loads(path.read_text())["unfreeze"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} has no valid `unfreeze`: {RERUN}") from None
    if unfreeze == "all" or (isinstance(unfreeze, int) and not isinstance(unfreeze, bool) and unfreeze >= 0):
        return unfreeze
    raise UserError(f"{path}: unfreeze={unfreeze!r} is not 0, a number of blocks or 'all': {RERUN}")


# --- the report ----------------------------------------------------------------------------------------------

WHY = {
    "frozen_features": (
        "Little data per class: updating the backbone's weights would overfit it. And the images look like the "
        "pretraining data, so its features already describe them well. Keep the whole backbone frozen and train "
        "only a head on the cached features: the `train_heads` models (`finetune.unfreeze: 0` if you fine-tune "
        "the head end to end)."),
    "partial_finetune": (
        "The images differ from the pretraining data, so the last blocks' features, the ones most specific to "
        "the pretraining classes, fit them less well; but with little data per class, retraining the whole "
        "network would overfit. Keep the early, generic blocks (edges, textures) frozen and retrain the last "
        "{unfreeze} of {blocks} blocks ({names}) with the head: `finetune.unfreeze: {unfreeze}` "
        "(the depth is `advise.partial_unfreeze`)."),
    "full_finetune": (
        "Enough data to update every weight without overfitting, and the pretrained weights are a good start "
        "for images like these: fine-tune the whole network at a low learning rate: `finetune.unfreeze: all`."),
    "from_scratch": (
        "Enough data to train the network itself, and the images are far from the pretraining domain, so the "
        "pretrained weights buy little: train from scratch by setting `backbone.weights: none` and "
        "`finetune.unfreeze: all`. Starting from the pretrained weights is often still as good or better in "
        "practice (cs231n): compare it with `finetune.unfreeze: all` and the pretrained weights."),
}


def report(advice: dict[str, Any]) -> str:
    """reports/advice.md: the recommendation, the numbers against their thresholds (with the param keys), why."""
    counts, unfreeze, sim = advice["images_per_class"], advice["unfreeze"], advice["similarity"]
    headline = (f"**{advice['strategy']}: `finetune.unfreeze: {unfreeze}`** — quadrant **{advice['size']} data, "
                f"{advice['domain']} domain**. `finetune.unfreeze: auto` follows this advice.")
    size_row = (f"| train images per class (median of {len(counts['train'])} classes; min {counts['min']}, "
                f"max {counts['max']}) | {counts['median']:g} | large at ≥ {advice['large_per_class']} "
                f"(`{PARAM_KEYS['large_per_class']}`) | {advice['size']} |")
    if sim is None:
        domain_row = "| similarity to the pretraining data | — | none: `backbone.weights: none` | different |"
    else:
        rule = "≤" if sim["rule"] == "<=" else "≥"
        domain_row = (f"| similarity: {sim['measure']} on {sim['images']} train images | {sim['value']:.4f} | "
                      f"similar at {rule} {sim['threshold']:g} (`{sim['param']}`) | {advice['domain']} |")
    lines = ["# Strategy advice", "", headline, "", "| question | measured | threshold (param) | answer |",
             "|---|---:|---|---|", size_row, domain_row, "", "## Why", ""]
    if advice["weights"] is None:
        lines.append(
            "`backbone.weights` is `none`: the backbone is a random init, so there is no pretraining domain to "
            "compare the images with and nothing worth keeping frozen. The only sensible strategy is to train "
            "everything from scratch: `backbone.weights: none` with `finetune.unfreeze: all`.")
        if advice["size"] == "small":
            lines += ["", (
                f"With a median of {counts['median']:g} train images per class (below "
                f"`{PARAM_KEYS['large_per_class']}` = {advice['large_per_class']}), a model trained from scratch "
                "will most likely do worse than a pretrained backbone: compare it with pretrained "
                "`backbone.weights` (e.g. `DEFAULT`) and the heads on frozen features.")]
    else:
        lines.append(WHY[advice["strategy"]].format(unfreeze=unfreeze, blocks=advice["blocks"],
                                                    names=", ".join(advice["unfrozen_blocks"])))
    if sim is not None:
        other = (f"top-1 confidence {sim['top1_confidence']:.3f}, entropy {sim['entropy']:.3f}"
                 if sim["measure"] == "bn_shift" else f"entropy {sim['entropy']:.3f}")
        lines += ["", "## How similarity was measured", "", (
            f"{sim['images']} train images (seeded choice, `advise.sample`, `advise.seed`) went through the "
            f"pretrained classifier. {sim['measure']} = {sim['how']}. Also measured, for "
            f"information: the classifier's {other} (mean over images; entropy divided by its maximum).")]
    lines += ["", (
        "The thresholds are rules of thumb with documented defaults (docs/finetune.md, \"The strategy advisor\"); "
        "the experiments that compare strategies (`dvc exp run -S finetune.unfreeze=…`) are the final word."),
        "", "## Train images per class", "", "| class | images |", "|---|---:|"]
    lines += [f"| {name} | {n} |" for name, n in counts["train"].items()]
    return "\n".join(lines) + "\n"
