"""What the fine-tune loop eats: batches of images (augmented per epoch, seeded); the frozen prefix's stored outputs
come from finetune/prefix.py."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from transfer_learning.common.errors import UserError
from transfer_learning.data import manifest
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.store import store_key
from transfer_learning.features.views import (
    PLAIN_VIEW,
    ViewRequest,
    collate,
    one_thread_worker,
    read_image,
)
from transfer_learning.params import AugmentParams


@dataclass(frozen=True)
class LabelledImages:
    requests: list[ViewRequest]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.requests)

    def keys(self) -> list[str]:
        return [store_key(r.sha256, PLAIN_VIEW) for r in self.requests]


def split_images(split: str) -> LabelledImages:
    classes = {label: i for i, label in enumerate(manifest.read_classes())}
    rows = [row for row in manifest.read() if row.split == split]
    return LabelledImages([ViewRequest(r.path, r.sha256, 0) for r in rows],
                          np.array([classes[r.label] for r in rows], dtype=np.int64))


def augmentation(augment: AugmentParams, preprocessing: Preprocessing) -> v2.Compose | None:
    """finetune.augment as torchvision v2 transforms ending in uint8 pixels; None when it does nothing. Without a
    random resized crop, the flip and jitter start from the evaluation pixels (data/pixels.py), not from a resize
    of torch's own."""
    if not (augment.random_resized_crop or augment.hflip or augment.color_jitter > 0):
        return None
    steps: list = []
    if augment.random_resized_crop:
        steps.append(v2.RandomResizedCrop(preprocessing.crop, interpolation=InterpolationMode(
            preprocessing.interpolation), antialias=True))
    else:
        steps.append(preprocessing.pixels())
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return v2.Compose(steps if not augment.random_resized_crop else [*steps, v2.PILToTensor()])


class AugmentedImages(Dataset):
    """(uint8 CHW | None, error | None) per index, like ViewDataset; the randomness is seeded per (seed, epoch,
    image), so the same run gives the same pixels whatever worker draws them."""

    def __init__(self, requests: list[ViewRequest], transform: v2.Compose, preprocessing: Preprocessing, seed: int):
        self.requests, self.transform, self.preprocessing, self.seed = requests, transform, preprocessing, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int):
        request = self.requests[index]
        image, error = read_image(request, self.preprocessing)
        if error is not None:
            return None, error
        torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(request.sha256[:12], 16))
        return self.transform(image), None


def loader(dataset: Dataset, order: list[int], batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers, collate_fn=collate,
                      prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=one_thread_worker)


def checked(batch, errors: list[str]) -> torch.Tensor:
    if errors:
        raise UserError(f"cannot read {len(errors)} training image(s): " + "; ".join(errors[:5]))
    return batch


def image_batches(dataset: Dataset, order: list[int], batch_size: int, workers: int,
                  preprocessing: Preprocessing) -> Iterator[torch.Tensor]:
    """Normalized float batches in `order`."""
    for batch, _, errors in loader(dataset, order, batch_size, workers):
        yield preprocessing.normalize(checked(batch, errors))
