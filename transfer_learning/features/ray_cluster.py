"""The Ray cluster extract.engine: ray runs on (extract.ray.address): `local` starts one in this process sized to
this machine and stops it afterwards; `auto`, `host:port` (the head's GCS address, printed by `ray start --head`) or
`ray://host:port` (Ray Client) joins a running one. A process already connected to Ray (a notebook, a test) keeps
its connection.

An address nobody answers fails within PROBE_SECONDS with a UserError naming extract.ray.address: left to itself,
`ray.init` retries a dead GCS address for over a minute.
"""
from __future__ import annotations

import logging
import os
import site
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transfer_learning.common.errors import UserError
from transfer_learning.params import RAY_ADDRESSES, RAY_HOST_PORT

log = logging.getLogger(__name__)
PROBE_SECONDS = 5.0


def probe(address: str) -> None:
    """A TCP connection to host:port within PROBE_SECONDS, or a UserError naming extract.ray.address."""
    match = RAY_HOST_PORT.fullmatch(address)
    if match is None:
        return
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            pass
    except OSError as error:
        raise UserError(f"extract.ray.address {address!r}: no Ray cluster answers at {host}:{port} "
                        f"({error.strerror or error}). Start one (`ray start --head` on the head node, "
                        "`ray start --address=<head>:6379` on the others) or set extract.ray.address to local "
                        "to run on this machine") from None


PACKAGE = Path(__file__).resolve().parents[1]  # transfer_learning/


def job_options(ship_package: bool = True) -> dict:
    """ray.init's options for any cluster: warnings only, and this package shipped to every worker (Ray uploads it
    once per job; a remote node has the libraries of requirements.txt, not the project's code) unless told not to."""
    options = dict(logging_level=logging.WARNING, log_to_driver=False)
    if ship_package:
        options["runtime_env"] = {"py_modules": [str(PACKAGE)], "excludes": ["__pycache__"]}
    return options


def importable_by_local_workers() -> bool:
    """Whether the workers of a cluster this process starts import this very package without it being shipped:
    they inherit this process's environment (PYTHONPATH, the venv's site-packages) and get its working directory
    on sys.path. Shipping it needlessly costs time: Ray zips it, and its workers unpack it and start in that
    runtime_env (measured: the first task 0.9 s after ray.init instead of 0.3 s)."""
    reachable = [Path.cwd(), *(Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p),
                 *(Path(p) for p in site.getsitepackages())]
    return any(PACKAGE.parent == path.resolve() for path in reachable)


# Ray starts one idle worker per CPU when the first driver connects; extract's actors and reader tasks never take
# them (measured on 2 cores: 2 workers of ~1 s CPU each, idle until shutdown), so the local cluster starts none
NO_PRESTARTED_WORKERS = {"prestart_worker_first_driver": False}


def local_cluster_options() -> dict:
    """ray.init's options for the in-process cluster: this machine's cores, no dashboard, no idle workers."""
    return dict(num_cpus=os.cpu_count(), include_dashboard=False, _system_config=NO_PRESTARTED_WORKERS,
                **job_options(ship_package=not importable_by_local_workers()))


@contextmanager
def ray_cluster(address: str) -> Iterator[dict[str, float]]:
    """Connected to the cluster at `address` for the block; yields its total resources (CPU, GPU, ...)."""
    import ray

    probe(address)
    started_here = False
    if ray.is_initialized():
        log.info("Ray: using this process's existing connection (extract.ray.address %s not used)", address)
    else:
        try:
            if address == "local":
                ray.init(**local_cluster_options())
            else:
                ray.init(address=address, **job_options())
        except ConnectionError as error:
            raise UserError(f"extract.ray.address {address!r}: cannot connect to a Ray cluster ({error}); "
                            f"valid: {RAY_ADDRESSES}") from None
        except ValueError as error:
            if "ray[client]" not in str(error):
                raise
            raise UserError(f"extract.ray.address {address!r}: Ray Client (ray://) needs grpcio: "
                            "`pip install 'ray[client]'` at the version of requirements.txt, or, from a node of the "
                            "cluster, use the head's <host>:6379 instead") from None
        started_here = True
    try:
        yield ray.cluster_resources()
    finally:
        if started_here:
            ray.shutdown()
