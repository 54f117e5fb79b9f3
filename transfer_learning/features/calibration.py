"""The images int8 quantization is calibrated on: a seeded sample of the train split, fed through exactly the
preprocessing extract uses (ViewDataset's plain view, then data/pixels.py's NormalizeTable)."""
from __future__ import annotations

import random

from onnxruntime.quantization import CalibrationDataReader
from torch.utils.data import DataLoader

from transfer_learning.backbone.onnx_export import INPUT
from transfer_learning.common.errors import UserError
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.manifest import Row
from transfer_learning.data.pixels import NormalizeTable
from transfer_learning.features.views import ViewDataset, ViewRequest, collate

METHODS = ("MinMax", "Percentile", "Entropy")
BATCH = 16


def sample(rows: list[Row], count: int, seed: int) -> list[Row]:
    """`count` distinct train images (all of them if fewer), chosen by `seed` from the train rows in sha256 order:
    the same images whatever order the manifest lists them in."""
    train = sorted({row.sha256: row for row in rows if row.split == "train"}.values(), key=lambda row: row.sha256)
    if not train:
        raise UserError("extract.precision: int8 is calibrated on train images, and the manifest has none")
    return random.Random(seed).sample(train, min(count, len(train)))


class Reader(CalibrationDataReader):
    """Batches of normalized images for onnxruntime.quantization.quantize_static."""

    def __init__(self, rows: list[Row], preprocessing: Preprocessing):
        dataset = ViewDataset([ViewRequest(row.path, row.sha256, 0) for row in rows], preprocessing)
        self.batches = iter(DataLoader(dataset, batch_size=BATCH, collate_fn=collate))
        self.normalize = NormalizeTable.of(preprocessing)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        pixels, _, errors = batch
        if errors:
            raise UserError("cannot calibrate int8 on " + "; ".join(errors[:5]))
        return {INPUT: self.normalize.inputs(pixels.numpy())}
