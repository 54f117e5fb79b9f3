"""params.yaml, validated once into typed objects.

Every stage calls `load_params()` first: an unknown key, a wrong type, an unknown arch, weights name, estimator or
data source anywhere in the file fails here, before the stage's work, with one message per problem naming the key
and the valid choices. The names are looked up in common/catalog.py's listings, so the check imports neither
torchvision nor scikit-learn and costs ~10 ms.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from transfer_learning.common import catalog
from transfer_learning.common.dvc_outputs import output_holding
from transfer_learning.common.errors import UserError

PARAMS_FILE = Path("params.yaml")
BUILTIN_SOURCES = ("fashion-mnist", "digits")
BUILTIN_PER_CLASS = 300  # data.per_class: auto on a built-in source: the demo's size, minutes on 2 CPU cores

# where data.exclude and data.relabel lists live: a folder prepare depends on in dvc.yaml
CURATION_FOLDER = "data/curation"
# folders the project itself uses (relative to its root): the feature store may be none of them nor hold one,
# as its upkeep (gc, verify) deletes and renames what it finds in its folder
PROJECT_FOLDERS = ("data", "models", "metrics", "plots", "reports", "stages", "transfer_learning", "tests",
                   "benchmarks", ".dvc", ".git", "data/prepared", "data/features", CURATION_FOLDER)
# folders that DVC or git own entirely: the store may not sit inside one, nor inside any output of dvc.yaml or of a
# .dvc file (transfer_learning/common/dvc_outputs.py), which DVC replaces as a whole
OWNED_FOLDERS = ("data/prepared", "data/features", ".dvc", ".git")

DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# YAML 1.2 (what DVC's own YAML reader follows) reads `1e-3` and `1.0e3` as floats; PyYAML (YAML 1.1) only with a
# dot and a signed exponent, and gives the string '1e-3' otherwise
YAML12_FLOAT = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$")


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent floats without a dot (`lr: 1e-3`) as numbers."""


class LibyamlParamsLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """ParamsLoader on libyaml's parser: a tenth of the CPU for the params file every stage process reads. Its
    error messages lack the line and caret that ParamsLoader shows, so load_params reports errors with ParamsLoader."""


for _loader in (ParamsLoader, LibyamlParamsLoader):
    _loader.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))


def _float_from_text(value: Any) -> Any:
    """A decimal number written as text ('1e-3', '0.5') is that number; anything else (a bool, 'nan') is left
    to the strict float check, which refuses it."""
    if isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
        return float(value)
    return value


# a float field: an int or a float, or text that spells a decimal number; never a bool
Float = Annotated[float, BeforeValidator(_float_from_text)]


class Section(BaseModel):
    # strict: a number is a number (`batch_size: true` is not 1, `epochs: "5"` and `epochs: 5.0` are not 5), a flag
    # is true or false; an int is still a valid float, and so is decimal text (Float: PyYAML's `1e-3`)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(Section):
    source: str = "fashion-mnist"
    # auto: a built-in source is capped at the demo's size, the user's own folder or CSV is used whole (a cap is
    # asked for, never assumed); a number caps any source; null never caps
    per_class: Union[Literal["auto"], Annotated[int, Field(ge=1)], None] = "auto"
    val_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.15
    test_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.15
    seed: int = 0
    # how a 16-bit image's values are scaled to 8 bits: auto = by the smallest of 8/10/12/14/16 bits that holds
    # its maximum (a 16-bit file holding 12-bit camera data is not nearly black); a number forces that depth
    bit_depth: Union[Literal["auto"], Literal[8, 10, 12, 14, 16]] = "auto"
    # pixels on an image's shorter side below which it is rejected: too small to show what an ImageNet backbone
    # learnt to see (an icon, a 3x3 thumbnail); 8 keeps sklearn's 8x8 digits
    min_side: Annotated[int, Field(ge=1)] = 8
    # CSVs of images to leave out / to give another label (an image by its `path` or `sha256` column; relabel's new
    # label in `label`, else `suggested_label`): the audit's lists, copied and trimmed, are valid input. They live in
    # CURATION_FOLDER, a dep of prepare in dvc.yaml, so that an edited list re-runs prepare (DVC cannot take a
    # params list of files as deps)
    exclude: list[str] = []
    relabel: list[str] = []

    @field_validator("exclude", "relabel", mode="before")
    @classmethod
    def _csv_files(cls, files: Any) -> Any:
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list):
            return files
        folder = Path(CURATION_FOLDER).resolve()
        for name in files:
            if not isinstance(name, str):
                continue
            path = Path(name)
            if Path("reports/audit").resolve() in path.resolve().parents:
                raise ValueError(f"{name!r} is one of the audit's outputs, which it rewrites after prepare runs "
                                 f"(a loop): copy it into {CURATION_FOLDER}/ (e.g. {CURATION_FOLDER}/exclude.csv), "
                                 "keep the rows you agree with, and name that file")
            if folder not in path.resolve().parents:
                raise ValueError(f"{name!r} is not in {CURATION_FOLDER}/, the folder prepare depends on in "
                                 "dvc.yaml (DVC re-runs prepare when a list there changes, and would not see one "
                                 f"elsewhere); valid: a CSV file in {CURATION_FOLDER}/, e.g. "
                                 f"{CURATION_FOLDER}/exclude.csv")
            if not path.is_file() or path.suffix.lower() != ".csv":
                why = "does not exist" if not path.exists() else "is not a CSV file"
                raise ValueError(f"{name!r} {why}; valid: a list of CSV files in {CURATION_FOLDER}/ with a path or "
                                 "sha256 column (a queued experiment sees only committed files: commit the list)")
        return files

    @field_validator("per_class", mode="before")
    @classmethod
    def _per_class_choice(cls, per_class: Any) -> Any:
        if per_class is None or per_class == "auto" or (type(per_class) is int and per_class >= 1):
            return per_class
        raise ValueError(f"valid: auto ({BUILTIN_PER_CLASS} per class for {' and '.join(BUILTIN_SOURCES)}, every "
                         "image of a folder or CSV), a number of images per class (1 or more), or null (every image)")

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source in BUILTIN_SOURCES:
            return source
        path = Path(source)
        if path.is_dir() or (path.is_file() and path.suffix.lower() == ".csv"):
            return source
        if path.suffix.lower() == ".csv":
            raise ValueError(f"CSV file {source!r} does not exist")
        raise ValueError(
            f"{source!r} is neither a built-in source ({', '.join(BUILTIN_SOURCES)}) nor an existing folder "
            "of <class>/<image> files nor a CSV file with path,label[,split] columns"
        )

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"test_fraction: val_fraction + test_fraction must be below 1 (val_fraction is {self.val_fraction})"
            )
        return self

    @property
    def builtin(self) -> bool:
        return self.source in BUILTIN_SOURCES

    @property
    def cap(self) -> int | None:
        """At most this many images per class (None: every image), as data.per_class says for this source."""
        if self.per_class == "auto":
            return BUILTIN_PER_CLASS if self.builtin else None
        return self.per_class


class BackboneParams(Section):
    arch: str = "mobilenet_v2"
    weights: str | None = "IMAGENET1K_V1"
    weights_path: str | None = None
    cut: Union[int, str] = "penultimate"
    pool: Literal["avg", "max", "none"] = "avg"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str, info: ValidationInfo) -> str:
        if not (info.context or {}).get("resolve_backbone", True):
            return arch
        valid = classification_archs()
        if arch not in valid:
            raise ValueError(f"{arch!r} is not a torchvision classification model; valid: {', '.join(valid)}")
        return arch

    @field_validator("weights", mode="before")
    @classmethod
    def _none_means_random_init(cls, weights: Any) -> Any:
        return None if weights is None or str(weights).lower() == "none" else weights

    @field_validator("cut", mode="before")
    @classmethod
    def _cut_number_or_name(cls, cut: Any) -> Any:
        if isinstance(cut, bool):
            raise ValueError("cut must be 'penultimate', a number of blocks, or a graph node name")
        if isinstance(cut, str) and cut.strip().isdigit():
            return int(cut)
        if isinstance(cut, int) and cut < 1:
            raise ValueError(f"cut={cut}: keep at least 1 block")
        return cut

    @model_validator(mode="after")
    def _weights_exist_for_arch(self, info: ValidationInfo) -> BackboneParams:
        if not (info.context or {}).get("resolve_backbone", True):
            return self
        if self.weights is None:
            if self.weights_path:
                raise ValueError("weights_path: set, but weights is none: name the weights the file holds")
            return self
        valid = catalog.torchvision_models()["weights"][self.arch]
        if self.weights != "DEFAULT" and self.weights not in valid:
            raise ValueError(
                f"weights: {self.weights!r} does not exist for {self.arch}; valid: {', '.join(valid)}, DEFAULT or none"
            )
        if self.weights_path and not Path(self.weights_path).is_file():
            raise ValueError(f"weights_path: {self.weights_path!r} is not a file")
        return self


class ExportParams(Section):
    opset: Annotated[int, Field(ge=13)] = 18
    atol: Annotated[Float, Field(gt=0)] = 1.0e-4


# extract.ray.address, besides local and auto: the head's GCS address or a Ray Client address
RAY_HOST_PORT = re.compile(r"(?:ray://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")
RAY_ADDRESSES = "local, auto, <head host>:<port> (`ray start --head` prints it, usually port 6379) or ray://<head>:10001"


class RayParams(Section):
    """extract.ray: where and how wide extract.engine: ray runs (transfer_learning/features/ray_engine.py)."""
    address: str = "local"  # local | auto | <head>:6379 | ray://<head>:10001
    actors: Annotated[int, Field(ge=1)] = 2
    batch_size: Annotated[int, Field(ge=1)] = 64
    # a CPU actor runs ONNX Runtime on max(1, round(this)) threads; with decode: tasks, actors x this + 1 CPU for
    # the reader tasks must fit the cluster (else the readers never run), hence 0.5 on 2 cores
    num_cpus_per_actor: Annotated[Float, Field(gt=0)] = 0.5
    # auto: 1 GPU per actor when the cluster has GPUs (shared when actors outnumber them), else 0 (CPU actors)
    num_gpus_per_actor: Union[Literal["auto"], Annotated[Float, Field(ge=0)]] = "auto"
    # where images are decoded: in the actors (no pixels through the object store) or in reader tasks on any CPU
    # of the cluster (what GPU actors need to be fed); auto: actors for CPU actors, tasks for GPU actors
    decode: Literal["auto", "actors", "tasks"] = "auto"

    @field_validator("address")
    @classmethod
    def _ray_address(cls, address: str) -> str:
        if address in ("local", "auto") or RAY_HOST_PORT.fullmatch(address):
            return address
        raise ValueError(f"{address!r} is not a Ray cluster address; valid: {RAY_ADDRESSES}")


class ExtractParams(Section):
    providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    batch_size: Annotated[int, Field(ge=1)] = 64
    workers: Annotated[int, Field(ge=0)] = 2
    store: str = "data/feature-store"
    dtype: Literal["float32", "float16"] = "float32"
    augment_views: Annotated[int, Field(ge=0, le=999)] = 0
    engine: Literal["local", "ray"] = "local"
    ray: RayParams = RayParams()
    precision: Literal["fp32", "fp16", "int8"] = "fp32"  # transfer_learning/features/quantize.py
    calibration_images: Annotated[int, Field(ge=1)] = 64  # int8: train images the quantization is calibrated on
    calibration_seed: int = 0
    calibration_method: Literal["MinMax", "Percentile", "Entropy"] = "MinMax"

    @field_validator("store")
    @classmethod
    def _store_has_its_own_folder(cls, store: str) -> str:
        root = Path.cwd().resolve()
        target = (root / store).resolve()
        used = [folder for folder in PROJECT_FOLDERS
                if target == (root / folder).resolve() or target in (root / folder).resolve().parents]
        inside = [folder for folder in OWNED_FOLDERS if (root / folder).resolve() in target.parents]
        output = output_holding(root, target) if store.strip() and not used and not inside else None
        if not store.strip() or used or inside or output:
            why = ("is empty" if not store.strip() else
                   f"is or holds the project's folder {used[0]}" if used else f"is inside {inside[0]}" if inside
                   else f"is inside {output.path}, an output of {output.owner} that DVC restores as a whole "
                        "from its cache (the store and everything in it would be lost)")
            raise ValueError(
                f"the feature store needs a folder of its own: {store!r} {why}, and the store's upkeep (gc, "
                "verify) deletes and renames what it finds there; valid: a new folder such as data/feature-store, "
                "or an absolute path outside the project; not the project root or a folder holding it, not "
                f"{', '.join(PROJECT_FOLDERS)}, nor a folder inside {', '.join(OWNED_FOLDERS)} or inside an output "
                "of dvc.yaml or of a .dvc file")
        return store

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, providers: list[str]) -> list[str]:
        known = catalog.onnxruntime_providers()
        unknown = [p for p in providers if p not in known]
        if unknown or not providers:
            raise ValueError(f"unknown ONNX Runtime provider(s) {unknown}; valid: {', '.join(known)}")
        return providers


class LogisticHead(Section):
    type: Literal["logistic"]
    C: Annotated[list[Annotated[Float, Field(gt=0)]], Field(min_length=1)] = [0.001, 0.01, 0.1, 1, 10, 100]
    max_iter: Annotated[int, Field(ge=1)] = 1000
    class_weight: Literal["balanced"] | None = None
    seed: int = 0


class LinearHead(Section):
    type: Literal["linear"]
    epochs: Annotated[int, Field(ge=1)] = 100
    lr: Annotated[Float, Field(gt=0)] = 1.0e-3
    weight_decay: Annotated[Float, Field(ge=0)] = 1.0e-4
    batch_size: Annotated[int, Field(ge=1)] = 256
    patience: Annotated[int, Field(ge=1)] = 10
    class_weight: Literal["balanced"] | None = None
    seed: int = 0


class MLPHead(LinearHead):
    type: Literal["mlp"]  # type: ignore[assignment]
    hidden: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [512]
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.2


DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class SklearnHead(Section):
    type: Literal["sklearn"]
    # a scikit-learn classifier by class name or dotted path, or a class from a module in trusted_modules
    estimator: str
    # modules (or packages) outside scikit-learn this head may import its estimator from: importing a module
    # runs its code, so nothing outside scikit-learn is imported unless a head lists it here
    trusted_modules: list[str] = []
    params: dict[str, Any] = {}
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    class_weight: Literal["balanced"] | None = None
    seed: int = 0  # given to the estimator as random_state when it has one and params/grid do not set it
    # heads are saved as ONNX; only an estimator skl2onnx cannot convert may be pickled, and only when this is true
    # (loading a pickle runs code: load such heads only from a source you trust)
    allow_pickle: bool = False

    @field_validator("estimator")
    @classmethod
    def _dotted_name(cls, estimator: str) -> str:
        if not DOTTED_NAME.fullmatch(estimator):
            raise ValueError(f"{estimator!r} is not a Python name or dotted path; {ESTIMATOR_FORMS}")
        return estimator

    @field_validator("trusted_modules")
    @classmethod
    def _module_names(cls, modules: list[str]) -> list[str]:
        bad = [m for m in modules if not DOTTED_NAME.fullmatch(m)]
        if bad:
            raise ValueError(f"{bad} are not module names; give importable names such as xgboost or my_pkg.models")
        return modules

    @model_validator(mode="after")
    def _estimator_is_a_classifier(self, info: ValidationInfo) -> SklearnHead:
        try:
            if (info.context or {}).get("resolve_estimators", True):
                self.check_estimator()
            else:
                self.check_trusted()  # needs no import
        except ValueError as error:
            raise ValueError(f"estimator: {error}") from None
        return self

    def check_trusted(self) -> None:
        module_name = self.estimator.rpartition(".")[0]
        if module_name.partition(".")[0] in ("", "sklearn") or _under(module_name, self.trusted_modules):
            return
        raise ValueError(f"{self.estimator!r}: module {module_name!r} is not scikit-learn and not in this head's "
                         f"trusted_modules, so it is not imported; {ESTIMATOR_FORMS}")

    def _sklearn_own(self) -> bool:
        module_name = self.estimator.rpartition(".")[0]
        return module_name.partition(".")[0] in ("", "sklearn") and not _under(module_name, self.trusted_modules)

    def _listed_sklearn_classifier(self) -> dict[str, Any]:
        """scikit-learn's own classifier the estimator names, looked up in the catalog of scikit-learn's classifiers
        (common/catalog.py: no import of scikit-learn, nor of the path given). ValueError says what is valid."""
        module_name, _, class_name = self.estimator.rpartition(".")
        classifiers = catalog.sklearn_classifiers()
        found = classifiers.get(class_name)
        if found is not None and (not module_name or module_name in found["modules"]):
            return found
        if found is not None:
            raise ValueError(f"{self.estimator!r}: scikit-learn's {class_name} is not in {module_name}; "
                             f"write {class_name} or {found['public']}")
        raise ValueError(f"{self.estimator!r} is not a scikit-learn classifier; {ESTIMATOR_FORMS}; "
                         f"scikit-learn's classifiers: {', '.join(classifiers)}")

    def check_estimator(self) -> None:
        """What new_estimator checks; for scikit-learn's own classifiers from the catalog, without importing it."""
        self.check_trusted()
        if not self._sklearn_own():
            self.new_estimator()
            return
        fails = self._listed_sklearn_classifier()["fails"]
        if fails is not None:
            raise ValueError(_construction_failed(self.estimator, fails))

    def estimator_class(self) -> type:
        """The class, checked to be a classifier before anything constructs it. ValueError says what is valid."""
        from sklearn.base import ClassifierMixin

        self.check_trusted()
        module_name, _, class_name = self.estimator.rpartition(".")
        if self._sklearn_own():
            # from the one module the catalog says holds it (the module named, else the public one): scikit-learn's
            # all_estimators would import every scikit-learn module, and through its array API support torch
            listed = self._listed_sklearn_classifier()
            return getattr(importlib.import_module(module_name or listed["public"].rpartition(".")[0]), class_name)
        try:
            found = getattr(importlib.import_module(module_name), class_name, None)
        except Exception as error:  # a trusted module may fail to import in any way
            raise ValueError(f"{self.estimator!r}: importing {module_name} failed: {error}") from None
        if not (isinstance(found, type) and issubclass(found, ClassifierMixin)):
            raise ValueError(f"{self.estimator!r} is not a classifier class (a subclass of "
                             f"sklearn.base.ClassifierMixin); {ESTIMATOR_FORMS}")
        return found

    def new_estimator(self) -> Any:
        """A new instance with its default arguments (params and grid are set on it later)."""
        found = self.estimator_class()
        try:
            return found()
        except Exception as error:  # whatever the constructor raises, the user fixes it in params.yaml
            raise ValueError(_construction_failed(self.estimator, str(error))) from None


def _construction_failed(estimator: str, error: str) -> str:
    return (f"{estimator}() failed: {error}; the estimator must construct without arguments (its settings go under "
            "params or grid)")


ESTIMATOR_FORMS = ("valid: a scikit-learn classifier by class name or dotted path (KNeighborsClassifier, "
                   "sklearn.neighbors.KNeighborsClassifier), or module.Class with that module (or its package) "
                   "listed in the head's trusted_modules")


def _under(module_name: str, packages: list[str]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in packages)


HeadSpec = Annotated[Union[LogisticHead, LinearHead, MLPHead, SklearnHead], Field(discriminator="type")]


class AugmentParams(Section):
    random_resized_crop: bool = True
    hflip: bool = True
    color_jitter: Annotated[Float, Field(ge=0)] = 0.0


class FinetuneParams(Section):
    enabled: bool = False
    unfreeze: Union[Annotated[int, Field(ge=0)], Literal["all", "auto"]] = 2
    init_head: str | None = "logreg"
    epochs: Annotated[int, Field(ge=1)] = 5
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr_head: Annotated[Float, Field(gt=0)] = 1.0e-3
    lr_backbone: Annotated[Float, Field(gt=0)] = 1.0e-4
    bn: Literal["frozen", "train"] = "frozen"
    patience: Annotated[int, Field(ge=1)] = 2
    cache_prefix: bool = False
    augment: AugmentParams = AugmentParams()
    # data-parallel training (DDP through torchrun) when nproc * nnodes > 1: processes per node, nodes, and node 0's
    # host:port that the other nodes join (transfer_learning/finetune/launch.py); not in the run's fingerprint
    nproc: Annotated[int, Field(ge=1)] = 1
    nnodes: Annotated[int, Field(ge=1)] = 1
    rdzv_endpoint: str | None = None

    @model_validator(mode="after")
    def _processes_fit_the_batch(self) -> FinetuneParams:
        if self.nnodes > 1 and not re.fullmatch(r"[^\s:]+:\d{1,5}", self.rdzv_endpoint or ""):
            given = "not set" if self.rdzv_endpoint is None else f"not {self.rdzv_endpoint!r}"
            raise ValueError(f"rdzv_endpoint: nnodes is {self.nnodes}: give node 0's address as host:port "
                             f"(e.g. node0.example.org:29400), {given}")
        if self.batch_size % (self.nproc * self.nnodes):
            raise ValueError(f"batch_size: {self.batch_size} is not a multiple of the {self.nproc * self.nnodes} "
                             "training processes (nproc x nnodes): each takes an equal share of every batch")
        return self


class AdviseParams(Section):
    """The strategy advisor's thresholds (transfer_learning/advise/advisor.py); rules of thumb, documented in
    docs/finetune.md."""

    # train images per class (the median class) at or above which the data counts as large: about ImageNet's
    # 1,000-1,300 per class, the scale at which these architectures are trained from scratch
    large_per_class: Annotated[int, Field(ge=1)] = 1000
    # BatchNorm shift (median over BN layers of the per-channel Gaussian KL from the running statistics) at or
    # below which the data counts as similar; measured on MobileNetV2: photo crops 0.02-0.03, Fashion-MNIST
    # 0.26-0.33, digits 0.37-0.38
    similar_shift: Annotated[Float, Field(gt=0)] = 0.1
    # top-1 softmax confidence at or above which the data counts as similar, only for a backbone without
    # BatchNorm statistics (ViT, Swin, ConvNeXt); measured on MobileNetV2: photo crops 0.45-0.52, Fashion-MNIST
    # 0.29-0.34, digits 0.08-0.11
    similar_confidence: Annotated[Float, Field(gt=0, lt=1)] = 0.4
    partial_unfreeze: Annotated[int, Field(ge=1)] = 2  # last blocks the partial_finetune strategy unfreezes
    sample: Annotated[int, Field(ge=1)] = 128  # train images the similarity is measured on (seeded choice)
    seed: int = 0


# model names that are not heads: the fine-tuned model (finetune_files.MODEL_NAME) in evaluate and predict, the key
# naming the best model in metrics/evaluate.json, and evaluate.models' keyword; refused in any letter case, as
# plots/confusion/<name>.csv would collide on a case-insensitive file system
RESERVED_MODEL_NAMES = ("finetune", "best", "all")
# no '.': dvc.yaml's stage per head declares the param heads.<name>, and DVC reads a dot there as one more level
HEAD_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _head_name(name: str) -> str:
    if not HEAD_NAME.fullmatch(name):
        raise ValueError("a head name is letters, digits, '_' and '-' (it names the folder models/heads/<name> and "
                         "the DVC stage train_heads@<name>, whose param heads.<name> could not hold a '.')")
    if name.lower() in RESERVED_MODEL_NAMES:
        raise ValueError(f"{name!r} is reserved ({', '.join(RESERVED_MODEL_NAMES)} name other things in "
                         "metrics/evaluate.json, evaluate.models and predict --model): choose another head name")
    return name


HeadName = Annotated[str, AfterValidator(_head_name)]


class EvaluateParams(Section):
    models: Union[Literal["all"], list[str]] = "all"


class LayersParams(Section):
    """The layer sweep (transfer_learning/layers/): the logistic head on every block's pooled features."""

    enabled: bool = False
    # all, or block numbers as `backbone.cut: N` counts them (1 = the first block); checked against meta.json at run
    blocks: Union[Literal["all"], Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]] = "all"
    C: Annotated[list[Annotated[Float, Field(gt=0)]], Field(min_length=1)] = [0.001, 0.01, 0.1, 1, 10, 100]
    # blocks whose rows are also stored under `backbone.cut: N`'s own fingerprint (each needs that cut's export)
    adopt: Literal["best", "all", "none"] = "best"


class AuditParams(Section):
    """The data audit (transfer_learning/audit/): label issues, near-copies, outliers and a map, on the cached
    features."""

    enabled: bool = True
    folds: Annotated[int, Field(ge=2)] = 5  # out-of-fold probabilities: k-fold, stratified, seeded
    seed: int = 0
    C: Annotated[Float, Field(gt=0)] = 0.03  # the logistic head's inverse regularization (no search: no label to
    # choose it on that would not be the one audited)
    dims: Annotated[int, Field(ge=2)] = 64  # principal components the logistic head is fitted on
    neighbors: Annotated[int, Field(ge=1)] = 40  # train/val neighbours whose votes are averaged with the head's
    rank_by: Literal["self_confidence", "normalized_margin"] = "self_confidence"
    near_copy_z: Annotated[Float, Field(gt=0)] = 5.0  # robust standard deviations below the median score
    outlier_z: Annotated[Float, Field(gt=0)] = 4.0
    map: Literal["pca", "umap"] = "pca"
    sheet: Annotated[int, Field(ge=1)] = 30  # images per contact sheet


def _default_heads() -> dict[str, Any]:
    return {
        "logreg": LogisticHead(type="logistic"),
        "linear": LinearHead(type="linear"),
        "mlp": MLPHead(type="mlp"),
        "knn": SklearnHead(
            type="sklearn", estimator="sklearn.neighbors.KNeighborsClassifier", grid={"n_neighbors": [5, 15]}
        ),
    }


class Params(Section):
    data: DataParams = DataParams()
    backbone: BackboneParams = Field(default_factory=BackboneParams)
    export: ExportParams = ExportParams()
    extract: ExtractParams = ExtractParams()
    heads: dict[HeadName, HeadSpec] = Field(default_factory=_default_heads)
    finetune: FinetuneParams = FinetuneParams()
    advise: AdviseParams = AdviseParams()
    evaluate: EvaluateParams = EvaluateParams()
    layers: LayersParams = LayersParams()
    audit: AuditParams = AuditParams()

    @field_validator("heads")
    @classmethod
    def _at_least_one_head(cls, heads: dict[str, Any]) -> dict[str, Any]:
        if not heads:
            raise ValueError("at least one head is needed, e.g. `logreg: {type: logistic}`")
        return heads

    @model_validator(mode="after")
    def _references_exist(self) -> Params:
        by_case: dict[str, str] = {}
        for name in self.heads:
            if name.lower() in by_case:
                raise ValueError(f"heads.{name}: the name differs from {by_case[name.lower()]!r} only in letter "
                                 "case, and their files would collide on a case-insensitive file system")
            by_case[name.lower()] = name
        if self.finetune.init_head is not None and self.finetune.init_head not in self.heads:
            raise ValueError(
                f"finetune.init_head: {self.finetune.init_head!r} is not a head; valid: {', '.join(self.heads)} or null"
            )
        return self


def classification_archs() -> list[str]:
    return catalog.torchvision_models()["archs"]


def load_params(path: Path | str = PARAMS_FILE, resolve_estimators: bool = True,
                resolve_backbone: bool = True) -> Params:
    """The validated params. Code that runs after a stage has checked the file (predict, fine-tuning's workers)
    may skip two checks:
    - `resolve_estimators=False`: the heads' estimators are not looked up among scikit-learn's classifiers (nor a
      trusted module's estimator imported); a module outside scikit-learn must still be in trusted_modules;
    - `resolve_backbone=False`: backbone.arch/weights are not checked against torchvision's names."""
    path = Path(path)
    try:
        text = path.read_text()
        try:
            raw = yaml.load(text, Loader=LibyamlParamsLoader) or {}
        except yaml.YAMLError:
            raw = yaml.load(text, Loader=ParamsLoader) or {}  # raises again, with the line and a caret
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project's root") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from None
    context = {"resolve_estimators": resolve_estimators, "resolve_backbone": resolve_backbone}
    try:
        return Params.model_validate(raw, context=context)
    except ValidationError as error:
        raise UserError(f"{path} is invalid:\n" + describe_errors(error, raw)) from None


HEAD_TYPES = {"logistic": LogisticHead, "linear": LinearHead, "mlp": MLPHead, "sklearn": SklearnHead}


def describe_errors(error: ValidationError, raw: dict[str, Any]) -> str:
    """One line per problem: the dotted key, what is wrong, and for an unknown key the valid ones."""
    lines = []
    for problem in error.errors():
        loc = _user_keys(problem["loc"], raw)
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        field, _, rest = message.partition(": ")
        keys, value = _lookup(given, field)
        if rest and value is not _MISSING:  # a check across keys starts its message with the key it is about
            loc, message, given = loc + keys, rest, value
        key = ".".join(loc) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; valid keys here: {', '.join(_valid_keys(loc[:-1], raw))}")
        elif isinstance(given, (dict, list)) and len(repr(given)) > 80:
            lines.append(f"  {key}: {message}")
        else:
            lines.append(f"  {key}: {message} (got {given!r})")
    return "\n".join(lines)


_MISSING = object()


def _lookup(given: Any, dotted: str) -> tuple[list[str], Any]:
    """The keys and value `dotted` names in `given`; a key may itself hold dots (a head named `v1.2`)."""
    keys: list[str] = []
    rest = dotted
    while rest:
        if not isinstance(given, dict):
            return keys, _MISSING
        key = next((k for k in sorted(map(str, given), key=len, reverse=True)
                    if rest == k or rest.startswith(k + ".")), None)
        if key is None:
            return keys, _MISSING
        keys.append(key)
        given, rest = given[key], rest[len(key) + 1:]
    return keys, given


# what pydantic adds to an error's loc besides the user's keys: union members, head types, dict-key checks
_PYDANTIC_PARTS = re.compile(r"int|str|float|bool|none|\[key\]|[a-z-]+\[.*\]|(constrained|function)-.*|"
                             + "|".join(HEAD_TYPES))


def _user_keys(loc: tuple, raw: Any) -> list[str]:
    """The keys a user wrote, found by walking params.yaml along loc; a part that is not there and is pydantic's
    own (`int`, `literal['all']`, `sklearn`) is left out."""
    keys, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int):
            keys.append(str(part))
            node = node[part] if isinstance(node, dict) or part < len(node) else None
        elif not (isinstance(part, str) and _PYDANTIC_PARTS.fullmatch(part)):
            keys.append(str(part))
            node = None
    return keys


def _valid_keys(parent: list[str], raw: dict[str, Any]) -> list[str]:
    if len(parent) == 2 and parent[0] == "heads":
        model: Any = HEAD_TYPES.get(raw.get("heads", {}).get(parent[1], {}).get("type"), LogisticHead)
    else:
        model = Params
        for part in parent:
            model = model.model_fields[part].annotation
    return list(model.model_fields)
