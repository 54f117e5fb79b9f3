"""The names params.yaml may use from installed libraries — torchvision's classification archs and each one's
weights, scikit-learn's classifiers, ONNX Runtime's providers — listed once per installed library and kept in the
user's cache folder, so that checking params.yaml (every stage, first) imports none of them
(torchvision alone takes 3-7 s to import, scikit-learn 1-3 s).

A listing is rebuilt when its library changes: the cache key holds the library's version and the path and
modification time of its __init__.py (found without importing it), and the Python running. Each cache file holds
the sha256 of its listing, checked on every read; a file that fails is rebuilt (and said so in the log).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transfer_learning.common.atomic import atomic_write_text

log = logging.getLogger(__name__)


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transfer_learning"


def installed(package: str, distribution: str) -> str:
    """What identifies the installed library: version, __init__.py path and modification time."""
    spec = importlib.util.find_spec(package)
    origin = spec.origin if spec and spec.origin else ""
    stamp = os.stat(origin).st_mtime_ns if origin else 0
    return f"{distribution}=={importlib.metadata.version(distribution)} {origin} {stamp}"


def _digest(listing: Any) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def cached(name: str, package: str, distribution: str, build: Callable[[], Any]) -> Any:
    """`build()`'s listing for the installed `package`, from the cache when it holds the listing of this very
    install; else built (importing the library) and cached."""
    key = f"{name} {installed(package, distribution)} {sys.executable} {sys.version}"
    path = cache_folder() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        saved = json.loads(path.read_text())
        if saved["key"] == key and saved["sha256"] == _digest(saved["listing"]):
            return saved["listing"]
        log.warning("%s does not match its recorded sha256 or library: listing %s again", path, name)
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as error:
        log.warning("%s is damaged (%r): listing %s again", path, error, name)
    listing = build()
    try:
        atomic_write_text(path, json.dumps({"key": key, "sha256": _digest(listing), "listing": listing}) + "\n")
    except OSError as error:  # a read-only home: correct, only slower next time
        log.warning("cannot cache the %s listing in %s (%s)", name, path.parent, error)
    return listing


def _torchvision_listing() -> dict[str, Any]:
    import torchvision
    from torchvision.models import get_model_weights

    archs = torchvision.models.list_models(module=torchvision.models)
    return {"archs": archs, "weights": {arch: [w.name for w in get_model_weights(arch)] for arch in archs}}


def torchvision_models() -> dict[str, Any]:
    """{"archs": torchvision's classification builders, "weights": {arch: its weights names}}."""
    return cached("torchvision", "torchvision", "torchvision", _torchvision_listing)


def _sklearn_listing() -> dict[str, dict[str, Any]]:
    from sklearn.utils.discovery import all_estimators

    classes = dict(all_estimators(type_filter="classifier"))  # imports every scikit-learn module
    modules = [(name, module) for name, module in list(sys.modules.items())
               if name == "sklearn" or name.startswith("sklearn.")]
    listing = {}
    for name, found in classes.items():
        try:
            with warnings.catch_warnings():  # a deprecated class warns when built; listing it is no use of it
                warnings.simplefilter("ignore")
                found()
            fails = None
        except Exception as error:  # what the user would see constructing it
            fails = str(error)
        listing[name] = {"modules": sorted(m for m, module in modules if getattr(module, name, None) is found),
                         "public": f"{found.__module__.split('._')[0]}.{found.__name__}", "fails": fails}
    return listing


def sklearn_classifiers() -> dict[str, dict[str, Any]]:
    """{class name: {"modules": the scikit-learn modules that hold it, "public": its public dotted path, "fails":
    the error its construction without arguments raises, or None}}, every classifier scikit-learn ships."""
    return cached("sklearn", "sklearn", "scikit-learn", _sklearn_listing)


def _providers_listing() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_all_providers())


def onnxruntime_providers() -> list[str]:
    """Every provider name ONNX Runtime knows (available here or not)."""
    distribution = next((d for d in ("onnxruntime", "onnxruntime-gpu") if _has_distribution(d)), "onnxruntime")
    return cached("onnxruntime", "onnxruntime", distribution, _providers_listing)


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
