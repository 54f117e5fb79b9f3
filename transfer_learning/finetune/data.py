"""What the fine-tune loop eats: batches of images (augmented per epoch, seeded), or cached outputs of the frozen
prefix, computed once per image and kept in the feature store under the prefix's own fingerprint."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from transfer_learning.common.errors import UserError
from transfer_learning.data import manifest
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.fingerprint import PIPELINE_VERSION
from transfer_learning.features.store import FeatureStore, store_key
from transfer_learning.features.views import (
    PLAIN_VIEW,
    ViewDataset,
    ViewRequest,
    collate,
    one_thread_worker,
    read_image,
)
from transfer_learning.params import AugmentParams

log = logging.getLogger(__name__)


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
    """finetune.augment as torchvision v2 transforms ending in uint8 pixels; None when it does nothing."""
    interpolation = InterpolationMode(preprocessing.interpolation)
    steps: list = []
    if augment.random_resized_crop:
        steps.append(v2.RandomResizedCrop(preprocessing.crop, interpolation=interpolation, antialias=True))
    else:
        steps += [v2.Resize(preprocessing.resize, interpolation=interpolation, antialias=True),
                  v2.CenterCrop(preprocessing.crop)]
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if not (augment.random_resized_crop or augment.hflip or augment.color_jitter > 0):
        return None
    return v2.Compose([*steps, v2.PILToTensor()])


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


def prefix_fingerprint(weights_sha256: str, prefix_node: str, preprocessing: Preprocessing, device_type: str) -> str:
    """The key of the prefix's cached outputs. The device type is in it: CUDA kernels give other (still fp32)
    roundings than the CPU's, and rows of one key must come from one computation."""
    spec = json.dumps({"weights": weights_sha256, "prefix_node": prefix_node, "preprocessing": preprocessing.to_json(),
                       "pipeline": PIPELINE_VERSION, "kind": "finetune-prefix", "device": device_type},
                      sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()


@contextlib.contextmanager
def full_fp32():
    """No TF32 (10-bit mantissa) in cuDNN convolutions or CUDA matmuls, whatever the GPU: cached rows are fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cached_prefix(prefix, images: LabelledImages, shape: tuple[int, ...], store_root: Path, fingerprint: str,
                  preprocessing: Preprocessing, batch_size: int, workers: int,
                  device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The frozen prefix's output for every image (plain view), N × shape, computed on `device` (where the
    prefix's weights are) for the images the store lacks, the rest reused."""
    keys = images.keys()
    dim = int(np.prod(shape))
    with FeatureStore(store_root, fingerprint, dim) as store:
        todo = [i for i, key in enumerate(keys) if key not in store]
        log.info("frozen prefix outputs %s: %d reused from %s, %d to compute", shape, len(keys) - len(todo),
                 store.dir, len(todo))
        if todo:
            dataset = ViewDataset([images.requests[i] for i in todo], preprocessing)
            done = 0
            with tqdm(total=len(todo), desc="frozen prefix", unit="img") as bar:
                for batch, _, errors in loader(dataset, list(range(len(todo))), batch_size, workers):
                    with full_fp32():
                        out = prefix(preprocessing.normalize(checked(batch, errors)).to(device)).cpu()
                    store.add([keys[i] for i in todo[done:done + len(out)]], out.reshape(len(out), -1).numpy())
                    done += len(out)
                    bar.update(len(out))
            store.commit()
            store.compact()
        rows = np.concatenate(list(store.gather(keys))) if keys else np.zeros((0, dim), np.float32)
    return torch.from_numpy(rows).reshape(len(keys), *shape)
