"""The images extract feeds to the backbone: view 0 is the plain preprocessed image, views 1..k are seeded
augmentations (RandomResizedCrop + horizontal flip), reproducible per (image, view) whatever worker runs them.

An augmented view's key holds, besides the augmentation's settings, the digest of what this process's augmentation
makes of a few probe images (data/probes.py) through this very dataset: the plain view's pixels are measured by the
feature fingerprint, the augmented views' by their key, so a torchvision change to the crop or the flip, or to the
RGB decode the augmented views read, leaves no augmented row of the old code served."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data.decode import read_checked, warnings_held_back
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.pixels import PlainPixels
from transfer_learning.data.probes import PROBES_DIR

# torch is imported where views are made: a process that only keys plain views (an extract that reuses every row)
# imports none
if TYPE_CHECKING:  # imported where augmented views are made: torchvision costs seconds of CPU (torch._dynamo)
    from torchvision.transforms import v2

PLAIN_VIEW = "0"
# the probes the augmentation is measured on: shrunk (a photo), enlarged, 16-bit grey, CMYK, EXIF-rotated, each
# read as the augmented views read their images (RGB); views 1..3 of each flip some and not others
AUGMENT_PROBES = ("rgb_photo_600x450.jpg", "rgb8_21x33.png", "grey16_19x23.png", "cmyk_26x20.jpg",
                  "exif_rotated_22x14.jpg")
AUGMENT_PROBE_VIEWS = (1, 2, 3)


@dataclass(frozen=True)
class ViewRequest:
    path: str
    sha256: str
    view: int  # 0 = plain


def augment_spec(preprocessing: Preprocessing) -> dict:
    return {"random_resized_crop": {"size": preprocessing.crop, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]},
            "hflip": 0.5}


def view_id(view: int, preprocessing: Preprocessing) -> str:
    """How a view is keyed in the store: '0', or the hash of the augmentation spec and of what this process's
    augmentation makes of the probes (`augment_digest`), and the view's number."""
    if view == 0:
        return PLAIN_VIEW
    spec = json.dumps({**augment_spec(preprocessing), "pixels": augment_digest(preprocessing)}, sort_keys=True)
    return f"aug-{hashlib.sha256(spec.encode()).hexdigest()[:8]}-{view}"


@functools.lru_cache(maxsize=None)
def augment_digest(preprocessing: Preprocessing) -> str:
    """sha256 of the seeded augmented views AUGMENT_PROBE_VIEWS of AUGMENT_PROBES as ViewDataset gives them,
    computed once per process and preprocessing. torch's random state is left as it was."""
    requests = [ViewRequest(str(PROBES_DIR / name), sha256_bytes((PROBES_DIR / name).read_bytes()), view)
                for name in AUGMENT_PROBES for view in AUGMENT_PROBE_VIEWS]
    import torch

    dataset = ViewDataset(requests, preprocessing)
    hashed = hashlib.sha256()
    with warnings_held_back(), torch.random.fork_rng(devices=[]):
        for index, request in enumerate(requests):
            tensor, error = dataset[index]
            hashed.update(f"{Path(request.path).name} {request.view}\0".encode())
            if error is not None:  # a decoder gone is a change of pixels too; the reason, not this checkout's path
                hashed.update(f"bad image: {error.removeprefix(request.path)}\0".encode())
                continue
            hashed.update(f"{tensor.dtype} {tuple(tensor.shape)}\0".encode())
            hashed.update(tensor.contiguous().numpy().tobytes())
    return hashed.hexdigest()


def augment_transform(preprocessing: Preprocessing) -> v2.Compose:
    from torchvision.transforms import InterpolationMode, v2

    spec = augment_spec(preprocessing)["random_resized_crop"]
    return v2.Compose([
        v2.RandomResizedCrop(spec["size"], scale=tuple(spec["scale"]), ratio=tuple(spec["ratio"]),
                             interpolation=InterpolationMode(preprocessing.interpolation), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.PILToTensor(),
    ])


def view_seed(sha256: str, view: int) -> int:
    return int(sha256[:15], 16) + view


def read_image(request: ViewRequest, preprocessing: Preprocessing):
    """(RGB image, None), or (None, the reason with the path): data.decode.read_checked with the data's bit-depth
    rule."""
    return read_checked(request.path, request.sha256, preprocessing.bit_depth)


class ViewDataset:
    """Items are (uint8 CHW tensor | None, error | None): a file that changed since prepare or no longer decodes is
    reported with its path by the caller instead of crashing a worker. A map-style dataset for torch's DataLoader
    (len and indexing), not torch's Dataset subclass: importing this module imports no torch."""

    def __init__(self, requests: list[ViewRequest], preprocessing: Preprocessing, grey_planes: bool = False):
        """grey_planes: a grey image's plain view stays one plane (1HW) for a consumer that normalizes it into three
        channels itself (data.pixels.NormalizeTable): a third of the bytes to stack and pass between processes."""
        self.requests = requests
        self.preprocessing = preprocessing
        self.grey_planes = grey_planes
        self.plain = PlainPixels.of(preprocessing)  # torchvision's Resize + CenterCrop, bit for bit (data/pixels.py)
        self.augment = augment_transform(preprocessing) if any(r.view for r in requests) else None

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int):
        import torch

        request = self.requests[index]
        if request.view == 0:
            pixels, error = self.plain.read(request.path, request.sha256, self.preprocessing.bit_depth)
            if pixels is None:
                return None, error
            tensor = torch.from_numpy(pixels)
            return (tensor if self.grey_planes else tensor.expand(3, -1, -1)), None  # grey: 1 plane, or seen as 3
        image, error = read_image(request, self.preprocessing)
        if error is not None:
            return None, error
        torch.manual_seed(view_seed(request.sha256, request.view))
        return self.augment(image), None


def one_thread_worker(_worker: int) -> None:
    """DataLoader worker_init_fn: decoding workers share the cores with inference, one torch thread each."""
    import torch

    torch.set_num_threads(1)


def collate(items):
    """Runs in the worker: one stacked tensor of the good items, their positions in the batch, the errors.
    In a DataLoader worker the stack is written straight into shared memory, as torch's default_collate does:
    the batch goes to the main process through shared memory, and a stack in ordinary memory would be copied
    there once more."""
    import torch
    from torch.utils.data import get_worker_info

    good = [i for i, (_, error) in enumerate(items) if error is None]
    errors = [error for _, error in items if error is not None]
    if not good:
        return None, good, errors
    tensors = [items[i][0] for i in good]
    if len({len(t) for t in tensors}) > 1:  # grey planes beside colour images: the grey ones seen as three channels
        tensors = [t.expand(3, -1, -1) for t in tensors]
    out = None
    if get_worker_info() is not None:
        storage = tensors[0]._typed_storage()._new_shared(sum(t.numel() for t in tensors), device=tensors[0].device)
        out = tensors[0].new(storage).resize_(len(tensors), *tensors[0].shape)
    return torch.stack(tensors, out=out), good, errors
