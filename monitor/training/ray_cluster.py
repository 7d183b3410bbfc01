"""Joining a Ray cluster, or starting a local one, and checking it can hold the work asked of it.

Every check here runs before any work starts: an address nobody answers on, or more workers than
the cluster has CPUs or GPUs for, is an error naming what was asked and what is there.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any


class RayClusterError(RuntimeError):
    """The cluster cannot be reached or cannot hold the work; the message says which."""


@dataclass(frozen=True)
class WorkerShape:
    """What one worker holds: CPU threads, and a GPU or none."""

    cpus: int
    gpu: bool

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.cpus), "GPU": 1.0 if self.gpu else 0.0}


# Ray on Linux turns a 127.0.0.1 node address into the machine's outward one and listens on
# every interface; with this set before Ray is imported, a local cluster's node is 127.0.0.1 and
# its servers listen on loopback only (Ray's own switch, named for its single-machine platforms).
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def import_ray(local: bool = False) -> Any:
    """The ``ray`` module, or a RayClusterError saying how to install it. ``local``: a cluster
    started here will stay on loopback (when Ray is not imported yet; the test suite sets it)."""
    if local and "ray" not in sys.modules:
        os.environ.update(LOOPBACK_ONLY)
    try:
        import ray
    except ImportError as exc:
        raise RayClusterError(
            "Ray is not installed; install the 'ray' extra: pip install 'safety-monitor[ray]'"
        ) from exc
    return ray


def connect(
    address: str | None, workers: int, cpus: int | None = None, gpu: bool | None = None
) -> tuple[Any, WorkerShape]:
    """Join the cluster at ``address`` (``host:port`` of its GCS, or ``auto``), or start a local
    one on loopback when ``address`` is None, and check it has room for ``workers`` workers of
    ``cpus`` threads (default: the cluster's CPUs shared out) and a GPU each (``gpu`` None: one
    each when the cluster has GPUs — the driver itself may have none). Returns the ``ray``
    module, initialised, and the workers' shape.
    """
    ray = import_ray(local=address is None)
    if workers < 1:
        raise RayClusterError(f"--workers must be at least 1, got {workers}")
    if not ray.is_initialized():
        if address is None:
            ray.init(
                num_cpus=os.cpu_count() or 1,  # what is here: check_room refuses more
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
                configure_logging=False,
            )
        else:
            _check_reachable(address)
            try:
                ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RayClusterError(f"cannot join the Ray cluster at {address}: {exc}") from exc
    resources = ray.cluster_resources()
    if gpu is None:
        gpu = float(resources.get("GPU", 0.0)) >= 1
    shape = WorkerShape(cpus or max(1, int(resources.get("CPU", 1.0)) // workers), gpu)
    check_room(resources, workers, shape, address or "the local cluster")
    return ray, shape


def check_room(resources: dict[str, float], workers: int, shape: WorkerShape, where: str) -> None:
    """RayClusterError unless ``resources`` hold ``workers`` workers of ``shape``."""
    for name, need in shape.resources().items():
        if need == 0:
            continue
        have = float(resources.get(name, 0.0))
        if workers * need > have:
            raise RayClusterError(
                f"{workers} worker(s) x {need:g} {name} need {workers * need:g} {name}, "
                f"but {where} has {have:g}; ask for fewer --workers"
                + (" or fewer threads per worker" if name == "CPU" else "")
            )


def _check_reachable(address: str) -> None:
    """Fail fast on an address nobody answers on (Ray itself retries for a minute or more)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayClusterError(f"--address must be host:port (or auto), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise RayClusterError(
            f"nothing answers at the Ray address {address} ({exc}); is the cluster's head up?"
        ) from exc


def shutdown() -> None:
    """Leave the cluster (stopping it, when this process started it)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
