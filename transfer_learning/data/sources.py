"""Where images come from: built-in datasets written out as PNG files, a folder of <class>/<image>, or a CSV.

Each source yields `Candidate`s (path, label, optional fixed split); nothing is decoded here. A folder source
also reports the files it cannot offer for rejected.csv: names without an image extension, files outside a class
folder, symbolic links that do not lead to a file. A CSV names its files itself: each is decoded, whatever its
extension. A built-in source also says how many images each class has before data.per_class's cap.
"""
from __future__ import annotations

import csv
import errno
import gzip
import logging
import os
import re
import shutil
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from transfer_learning.common.errors import UserError
from transfer_learning.data.formats import IMAGE_EXTENSIONS
from transfer_learning.data.manifest import SPLITS

log = logging.getLogger(__name__)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOADS = Path("data/downloads")
# torchvision's FashionMNIST.classes and the files its download extracts (tests check both against torchvision):
# written here so that a prepare whose files are in place does not import torchvision (2 s)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class Candidate:
    path: Path
    label: str
    split: str | None = None


@dataclass(frozen=True)
class Unusable:
    """A file of a folder source that is not a candidate, and why (kind: one of manifest.REJECTION_KINDS)."""
    path: Path
    kind: str
    reason: str


def cap_per_class(candidates: list[Candidate], per_class: int | None, seed: int) -> list[Candidate]:
    """At most `per_class` per label, a seeded choice; the order of the result is deterministic."""
    if per_class is None:
        return candidates
    kept: list[Candidate] = []
    for class_index, label in enumerate(sorted({c.label for c in candidates})):
        rng = np.random.default_rng([seed, class_index])
        group = [c for c in candidates if c.label == label]
        if len(group) > per_class:  # a prefix of one permutation: raising per_class only adds images
            group = [group[i] for i in sorted(rng.permutation(len(group))[:per_class])]
        kept += group
    return kept


def link_problem(path: Path) -> str | None:
    """Why a symbolic link is not an image file to read (broken, looping, a folder), or None when it is fine."""
    if not path.is_symlink():
        return None
    try:
        target = path.stat()  # follows the link
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"symbolic link loop (-> {os.readlink(path)})"
        if error.errno == errno.ENOENT:
            return f"broken symbolic link: its target {os.readlink(path)} does not exist"
        return f"symbolic link cannot be followed: {error.strerror}"
    if stat.S_ISDIR(target.st_mode):
        return f"symbolic link to a folder (-> {os.readlink(path)}): not followed; link or copy the images instead"
    return None


def folder_candidates(root: Path) -> tuple[list[Candidate], list[Unusable]]:
    """(images of root/<class>/..., the other files of the folder, with the reason). Entries of root whose name
    starts with a dot are not looked at, as a file browser hides them."""
    unusable = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.is_dir():  # a linked class folder is fine: is_dir follows the link
            continue
        if (problem := link_problem(path)) is not None:
            unusable.append(Unusable(path, "link", problem))
        else:
            unusable.append(Unusable(path, "outside_class_folder",
                                     f"not inside a class folder: the label is the folder, {root}/<class>/<image>"))
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"data.source: folder {root} has no class folders; expected {root}/<class>/<image>")
    out: list[Candidate] = []
    for folder in classes:
        images = []
        for path in sorted(folder.rglob("*")):
            if (problem := link_problem(path)) is not None:
                unusable.append(Unusable(path, "link", problem))
            elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            elif path.is_file():
                unusable.append(Unusable(path, "extension", f"not an image file name: skipped, only "
                                                            f"{' '.join(IMAGE_EXTENSIONS)} are read"))
        if not images:
            links = [str(u.path) for u in unusable if u.kind == "link" and folder in u.path.parents]
            raise UserError(
                f"data.source: class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})"
                + (f", only symbolic links that do not lead to a file ({', '.join(links[:3])})" if links else "")
                + "; remove it or add images"
            )
        out += [Candidate(p, folder.name) for p in images]
    return out, unusable


def csv_candidates(csv_path: Path) -> list[Candidate]:
    """Rows of path,label[,split]; relative paths are relative to the CSV's folder."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if not {"path", "label"} <= set(columns):
                raise UserError(f"{csv_path}: needs columns path,label[,split]; "
                                f"found {', '.join(columns) or 'none'}")
            rows = list(reader)
    except UnicodeDecodeError as error:
        raise UserError(f"{csv_path}: not UTF-8 text ({error}); save it as UTF-8") from None
    out, missing = [], []
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"])
        path = path if path.is_absolute() else csv_path.parent / path
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise UserError(f"{csv_path} line {line}: split {split!r}; valid: {', '.join(SPLITS)} or empty")
        if not (row["label"] or "").strip():
            raise UserError(f"{csv_path} line {line}: empty label")
        if not path.is_file():
            missing.append(f"line {line}: {row['path']}")
        out.append(Candidate(path, row["label"].strip(), split))
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{csv_path}: {len(missing)} image path(s) do not exist ({shown})")
    if not out:
        raise UserError(f"{csv_path}: no rows")
    return out


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def write_pngs(images: np.ndarray, labels: list[str], names: list[str], out_dir: Path) -> list[Candidate]:
    """Grayscale uint8 arrays as PNG files under out_dir/<class>/<name>.png (skipped when already there)."""
    out = []
    for pixels, label, name in zip(images, labels, names):
        path = out_dir / _slug(label) / f"{name}.png"
        if not path.exists():  # written aside and renamed: a killed run leaves no cut-off PNG to skip next time
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f".{path.name}.part")
            Image.fromarray(pixels).save(part, format="PNG")
            part.replace(path)
        out.append(Candidate(path, label))
    return out


def write_capped_pngs(images: np.ndarray, labels: list[str], names: list[str], out_dir: Path,
                      per_class: int | None, seed: int) -> tuple[list[Candidate], Counter[str]]:
    """A built-in dataset's seeded per-class choice, written out as PNG files (only the chosen ones); and the
    images per class the dataset has."""
    chosen = cap_per_class([Candidate(Path(n), label) for n, label in zip(names, labels)], per_class, seed)
    index = {n: i for i, n in enumerate(names)}
    picked = [index[str(c.path)] for c in chosen]
    written = write_pngs(images[picked], [labels[i] for i in picked], [names[i] for i in picked], out_dir)
    return written, Counter(labels)


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_raw() -> Path:
    """torchvision's FashionMNIST raw folder, seeded from Debian's package so that its download is skipped."""
    root = DOWNLOADS
    raw = root / "FashionMNIST" / "raw"
    if DEBIAN_FASHION_MNIST.is_dir():
        # Debian recompressed the files (other md5s than torchvision's), so seed the extracted files,
        # which torchvision's FashionMNIST checks by presence only
        raw.mkdir(parents=True, exist_ok=True)
        for packaged in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
            extracted = raw / packaged.stem
            if not extracted.exists():
                with gzip.open(packaged) as source, open(f"{extracted}.part", "wb") as target:
                    shutil.copyfileobj(source, target)
                Path(f"{extracted}.part").replace(extracted)
        log.info("Fashion-MNIST from Debian's dataset-fashion-mnist (%s)", DEBIAN_FASHION_MNIST)
    if all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        return raw  # what torchvision's FashionMNIST(download=True) checks before it downloads
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), download=True)
    except Exception as error:
        raise UserError(
            f"data.source=fashion-mnist: cannot get Fashion-MNIST ({error}). Install Debian's package "
            "(apt-get install dataset-fashion-mnist) or allow torchvision's download."
        ) from None
    return raw


def fashion_mnist_candidates(out_dir: Path, per_class: int | None, seed: int
                             ) -> tuple[list[Candidate], Counter[str]]:
    raw = _fashion_mnist_raw()
    images = np.concatenate([_read_idx(raw / "train-images-idx3-ubyte"), _read_idx(raw / "t10k-images-idx3-ubyte")])
    targets = np.concatenate([_read_idx(raw / "train-labels-idx1-ubyte"), _read_idx(raw / "t10k-labels-idx1-ubyte")])
    names = [f"{'train' if i < 60000 else 't10k'}-{i if i < 60000 else i - 60000:05d}" for i in range(len(images))]
    labels = [FASHION_MNIST_CLASSES[t] for t in targets]
    return write_capped_pngs(images, labels, names, out_dir, per_class, seed)


def digits_candidates(out_dir: Path, per_class: int | None, seed: int) -> tuple[list[Candidate], Counter[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    labels = [str(t) for t in digits.target]
    names = [f"digit-{i:04d}" for i in range(len(labels))]
    return write_capped_pngs(pixels, labels, names, out_dir, per_class, seed)
