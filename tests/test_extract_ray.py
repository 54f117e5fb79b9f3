"""extract.engine: ray — real Ray Data, real actors, real ONNX Runtime, into the real HDF5 feature store.

One local Ray cluster serves the module (start-up costs seconds), the engine uses a connection the process already
has; the checks that need a cluster share one test, so that xdist workers do not each start one. The driver-kill
check runs the stage as its own process, which joins that cluster by its address (extract.ray.address host:port).
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages import extract
from tests.conftest import REPO
from tests.faults import actor_killed_once, faulty_env
from tests.test_extract import CUDA_VS_CPU_RTOL_OF_SCALE, metrics, read_split, set_params
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data import images
from transfer_learning.features import ray_engine
from transfer_learning.features.ray_actor import NodePixelsDiffer
from transfer_learning.features.ray_engine import check_fits, decode_in_tasks, gpus_per_actor, ort_threads
from transfer_learning.features.store import store_key
from transfer_learning.features.views import PLAIN_VIEW
from transfer_learning.features.runtime import CPU, CUDA
from transfer_learning.params import ExtractParams

RAY = {"engine": "ray", "ray": {"actors": 2, "batch_size": 8}}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from transfer_learning.features.ray_cluster import local_cluster_options

    ray.init(**local_cluster_options())
    yield
    ray.shutdown()


def store_keys(store: Path) -> list[str]:
    keys = []
    for path in store.glob("*/*.h5"):
        with h5py.File(path, "r") as handle:
            keys += [key.decode() for key in handle["keys"][:]]
    return keys


def features_of_every_split() -> dict:
    return {split: read_split(split) for split in ("train", "val", "test")}


# the same ONNX bytes in other processes, with other batch sizes and thread counts: ONNX Runtime's kernels may sum in
# another order, so float rounding, relative to the rows' scale
RAY_VS_LOCAL_RTOL_OF_SCALE = 1e-5


def assert_close_rows(got: np.ndarray, expected: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=RAY_VS_LOCAL_RTOL_OF_SCALE * scale)


def assert_same_features(a: dict, b: dict) -> None:
    for split in a:
        np.testing.assert_array_equal(a[split]["keys"], b[split]["keys"])
        assert_close_rows(a[split]["features"], b[split]["features"])
        assert a[split]["attrs"]["fingerprint"] == b[split]["attrs"]["fingerprint"]


def store_rows(store: Path) -> dict[str, np.ndarray]:
    rows = {}
    for path in store.glob("*/*.h5"):
        with h5py.File(path, "r") as handle:
            rows |= {key.decode(): row for key, row in zip(handle["keys"][:], handle["features"][:])}
    return rows


@pytest.mark.slow
def test_ray_rows_equal_local_rows_through_an_actor_kill_and_a_bad_image_and_each_engine_reuses_the_others(
        workdir, ray_cluster, monkeypatch, exported, tmp_path):
    """One test, one cluster (each Ray run starts its actors: seconds), both places images are decoded, and a stage
    process joining that cluster by its host:port that is SIGKILLed mid-run."""
    set_params(extract={"store": "store-local"})
    extract.main()
    local = features_of_every_split()
    assert metrics()["engine"] == "local" and "actors" not in metrics()

    # decoding in the actors, and one of them SIGKILLs itself at its 2nd batch: restarted, its batch retried
    marker = workdir / "actor-killed"
    with monkeypatch.context() as patched:
        patched.setattr(ray_engine, "BackboneActor", actor_killed_once(2, marker))
        set_params(extract={"store": "store-ray", **RAY, "ray": {"batch_size": 4, "decode": "actors"}})
        extract.main()
    assert marker.exists(), "no actor was killed: the test proved nothing"
    m = metrics()
    assert (m["engine"], m["actors"], m["computed"], m["reused"]) == ("ray", 2, 60, 0)
    assert m["fingerprint"] == local["test"]["attrs"]["fingerprint"]
    keys = store_keys(Path("store-ray"))
    assert len(keys) == len(set(keys)) == 60  # every row exactly once
    assert sorted(keys) == sorted(store_keys(Path("store-local")))
    assert_same_features(features_of_every_split(), local)

    set_params(extract={"store": "store-local", **RAY})  # ray on the store local filled: nothing to compute
    extract.main()
    assert (metrics()["engine"], metrics()["computed"], metrics()["reused"]) == ("ray", 0, 60)
    set_params(extract={"store": "store-ray", "engine": "local"})  # and local on the store ray filled
    extract.main()
    assert (metrics()["engine"], metrics()["computed"], metrics()["reused"]) == ("local", 0, 60)
    assert_same_features(features_of_every_split(), local)

    # decoding in reader tasks (GPU actors' default), with an image that no longer decodes; one actor is enough here
    rows = Path("data/prepared/manifest.csv").read_text().splitlines()
    victim, victim_sha256 = rows[-1].split(",")[0], rows[-1].split(",")[3]
    Path(victim).write_bytes(b"not an image any more")
    set_params(extract={"store": "store-tasks", **RAY, "ray": {"decode": "tasks", "actors": 1, "batch_size": 16}})
    with pytest.raises(UserError, match=f"cannot extract 1 image.*{victim}: changed since prepare"):
        extract.main()
    local_rows, task_rows = store_rows(Path("store-local")), store_rows(Path("store-tasks"))
    assert sorted(task_rows) == sorted(set(local_rows) - {store_key(victim_sha256, PLAIN_VIEW)})
    for key, row in task_rows.items():
        assert_close_rows(row, local_rows[key])
    Path("data/prepared/manifest.csv").write_text("\n".join(rows[:-1]) + "\n")
    set_params(extract={"store": "store-tasks", "engine": "local"})
    extract.main()
    assert (metrics()["computed"], metrics()["reused"]) == (0, 59)  # the failed ray run stored all the others

    # an actor whose node makes other probe pixels than the driver (here the driver's are another digest): the
    # worker's error reaches the user as the UserError it is, not as Ray's wrapping, and no row is stored
    with monkeypatch.context() as patched:
        patched.setattr(images, "probe_digest", lambda preprocessing: "0" * 64)
        set_params(extract={"store": "store-other-pixels", **RAY, "ray": {"actors": 1}})
        with pytest.raises(NodePixelsDiffer, match="this Ray node .* decodes the probe images to other pixels than "
                                                   "the driver: its libraries differ"):
            extract.main()
    assert store_rows(Path("store-other-pixels")) == {}

    assert_a_killed_driver_loses_at_most_its_last_commit_and_local_resumes(exported, tmp_path)


def test_the_actors_views_are_the_local_engines_and_the_plain_view_imports_no_torch(workdir):
    """decode_views (torch-free for view 0) gives ViewDataset's bytes and error messages; an actor in a fresh
    process computes rows of plain views without importing torch or torchvision (worth ~4 s per worker)."""
    from transfer_learning.backbone import files as backbone_files
    from transfer_learning.features.ray_actor import decode_views
    from transfer_learning.features.views import ViewDataset, ViewRequest

    rows = [line.split(",") for line in Path("data/prepared/manifest.csv").read_text().splitlines()[1:5]]
    Path(rows[1][0]).write_bytes(b"changed")
    Path(rows[2][0]).unlink()
    Path("not-an-image.png").write_bytes(b"junk")
    requests = [ViewRequest(path, sha256, view) for path, _, _, sha256 in rows for view in (0, 1)]
    requests.append(ViewRequest("not-an-image.png", sha256_bytes(b"junk"), 0))
    preprocessing = backbone_files.load().preprocessing.with_bit_depth(12)
    batch = {"key": np.arange(len(requests)), "path": np.array([r.path for r in requests]),
             "sha256": np.array([r.sha256 for r in requests]), "view": np.array([r.view for r in requests])}
    pixels, errors = decode_views(batch, preprocessing.to_json())
    dataset = ViewDataset(requests, preprocessing)
    for i, (tensor, error) in enumerate(dataset[i] for i in range(len(dataset))):
        assert errors[i] == (error or ""), requests[i]
        assert pixels[i].tobytes() == (np.zeros_like(pixels[i]) if tensor is None else tensor.numpy()).tobytes()
    assert sum(e == "" for e in errors) == 4 and all(e.startswith(r.path + ": ") for e, r in zip(errors, requests) if e)

    probe = f"""
import sys
import numpy as np
from transfer_learning.features.ray_actor import BackboneActor
actor = BackboneActor(open("models/backbone.onnx", "rb").read(), ["CPUExecutionProvider"], 2,
                      {preprocessing.to_json()!r}, feature_dim=1280, use_gpu=False, threads=1,
                      driver_probe_digest={preprocessing.probe_digest()!r})
out = actor({{"key": np.array(["a", "b"]), "path": np.array({[rows[0][0], rows[3][0]]!r}),
              "sha256": np.array({[rows[0][3], rows[3][3]]!r}), "view": np.array([0, 0])}})
assert list(out["error"]) == ["", ""] and np.abs(out["features"]).sum(axis=1).min() > 0, out
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "torchvision"}}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_worker_whose_libraries_make_other_probe_pixels_than_the_drivers_refuses_to_compute_rows(workdir):
    """The rows go under the driver's fingerprint, which holds its probe digest: an actor or a reader task on a node
    that decodes the probes otherwise (a decoder missing, another Pillow) stops before its first row. Here the
    driver's digest is that of another bit_depth rule, as a node whose decoding differs would measure it."""
    from transfer_learning.backbone import files as backbone_files
    from transfer_learning.features.ray_actor import BackboneActor, read_views

    preprocessing = backbone_files.load().preprocessing.with_bit_depth(12)
    elsewhere = preprocessing.with_bit_depth(8).probe_digest()
    assert elsewhere != preprocessing.probe_digest(), "the probes do not tell these rules apart: nothing is tested"
    rows = [line.split(",") for line in Path("data/prepared/manifest.csv").read_text().splitlines()[1:3]]
    batch = {"key": np.array(["a", "b"]), "path": np.array([r[0] for r in rows]),
             "sha256": np.array([r[3] for r in rows]), "view": np.array([0, 0])}
    refused = "this Ray node .* decodes the probe images to other pixels than the driver: its libraries differ " \
              r"\(Pillow .*imagecodecs .*\).*Install the same versions"
    with pytest.raises(NodePixelsDiffer, match=refused):
        read_views(batch, preprocessing.to_json(), driver_probe_digest=elsewhere)
    assert list(read_views(batch, preprocessing.to_json(), preprocessing.probe_digest())["error"]) == ["", ""]
    with pytest.raises(NodePixelsDiffer, match=refused):
        BackboneActor(b"not reached: the check comes first", ["CPUExecutionProvider"], 2, preprocessing.to_json(),
                      feature_dim=1280, use_gpu=False, threads=1, driver_probe_digest=elsewhere)
    assert issubclass(NodePixelsDiffer, UserError)  # the stage prints its message as one line, exit status 2


def test_an_unreachable_address_fails_naming_it(workdir):
    with socket.socket() as closed:  # a port that was just free: nothing listens on it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        set_params(extract={**RAY, "ray": {"address": address}})
        with pytest.raises(UserError, match=f"extract.ray.address '{address}': no Ray cluster answers"):
            extract.main()


def test_ray_params_are_checked_and_a_pool_too_big_for_the_cluster_is_refused():
    with pytest.raises(ValueError, match="ray.address\n.*'head' is not a Ray cluster address; valid: local, auto"):
        ExtractParams(ray={"address": "head"})
    with pytest.raises(ValueError, match="engine"):
        ExtractParams(engine="spark")
    assert ExtractParams(ray={"num_cpus_per_actor": 0.25, "num_gpus_per_actor": 0.5}).ray.num_gpus_per_actor == 0.5
    with pytest.raises(ValueError, match="decode"):
        ExtractParams(ray={"decode": "gpu"})
    # decoding in reader tasks: 2 actors at 1 CPU on 2 cores leave nothing for the readers, that run would hang
    with pytest.raises(UserError, match="needs 3 CPUs, the cluster has 2.*extract.ray.num_cpus_per_actor"):
        check_fits({"CPU": 2.0}, actors=2, cpus=1.0, gpus=0.0, readers=True)
    check_fits({"CPU": 2.0}, actors=2, cpus=1.0, gpus=0.0, readers=False)  # the actors decode: they fit
    with pytest.raises(UserError, match="needs 2 GPUs, the cluster has 1"):
        check_fits({"CPU": 8.0, "GPU": 1.0}, actors=2, cpus=1.0, gpus=1.0, readers=True)
    check_fits({"CPU": 2.0}, actors=2, cpus=0.5, gpus=0.0, readers=True)  # the default fits a 2-core machine
    # auto: a GPU each when there are enough, shared when not; reader tasks feed GPU actors, CPU actors decode
    assert [gpus_per_actor("auto", {"GPU": g}, actors=2) for g in (0, 1, 4)] == [0.0, 0.5, 1.0]
    assert (decode_in_tasks("auto", 0.5), decode_in_tasks("auto", 0.0), decode_in_tasks("tasks", 0.0)) == (
        True, False, True)
    assert (ort_threads(0.5, 0.0), ort_threads(4.0, 0.0), ort_threads(1.0, 1.0)) == (1, 4, 0)


@pytest.mark.gpu
def test_gpu_actors_by_default_on_a_cluster_with_gpus_share_the_cpu_rows(workdir, ray_cluster, onnxruntime_cuda):
    set_params(extract={"store": "store-cpu", "providers": [CPU]})
    extract.main()
    on_cpu = features_of_every_split()
    set_params(extract={"store": "store-gpu", "engine": "ray", "ray": {"actors": 1}})  # num_gpus_per_actor: auto
    extract.main()
    assert (metrics()["provider"], metrics()["computed"]) == (CUDA, 60)
    for split, cpu_rows in on_cpu.items():
        gpu_rows = read_split(split)
        np.testing.assert_array_equal(gpu_rows["keys"], cpu_rows["keys"])
        np.testing.assert_allclose(gpu_rows["features"], cpu_rows["features"], rtol=0,
                                   atol=CUDA_VS_CPU_RTOL_OF_SCALE * np.abs(cpu_rows["features"]).max())


def assert_a_killed_driver_loses_at_most_its_last_commit_and_local_resumes(exported: Path, tmp_path: Path) -> None:
    """The stage in a process of its own, joining the running cluster by its GCS host:port (as a driver on another
    machine would), is SIGKILLed right after the store's first commit of 8 rows: the local engine resumes the rest."""
    import ray

    address = ray.get_runtime_context().gcs_address
    work = tmp_path / "killed-driver"
    shutil.copytree(exported, work)
    with contextlib.chdir(work):  # one actor: a pool is proven above, and each actor is a worker process to start
        set_params(extract={**RAY, "ray": {"actors": 1, "batch_size": 8, "address": address}})
    jobs_before = {job["JobID"] for job in ray._private.state.jobs()}
    # the store commits each batch of 8 rows as it arrives; the driver is SIGKILLed right after the first commit
    killed = subprocess.Popen([sys.executable, "-m", "stages.extract"], cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=faulty_env(tmp_path / "faults", commit_rows=8, kill_after_commits=1))
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr
    new_drivers = [job["DriverPid"] for job in ray._private.state.jobs() if job["JobID"] not in jobs_before]
    assert new_drivers == [killed.pid], "the stage did not join the running cluster"
    committed = len(store_keys(work / "store"))
    total = len((work / "data/prepared/manifest.csv").read_text().splitlines()) - 1
    assert 0 < committed < total, "the kill should land mid-run"

    with contextlib.chdir(work):
        set_params(extract={"engine": "local"})  # the local engine resumes what the killed ray run committed
        extract.main()
        assert (metrics()["reused"], metrics()["computed"]) == (committed, total - committed)
