"""A local Redis Sentinel topology: one master, replicas and Sentinels, all on loopback.

For the failover test (tests/chaos/test_sentinel_failover.py) and for trying the
``redis+sentinel://`` URL by hand. Every node is a redis-server child with AOF on; the
data nodes and the Sentinels have different passwords, as in a real deployment.
"""

from __future__ import annotations

import functools
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import redis

from dspy_fleet.devtools.procs import Child, free_port, wait_until
from dspy_fleet.devtools.redis import RedisServer, find_redis_server

MASTER_NAME = "mymaster"


class SentinelTopology:
    """``replicas`` replicas of a master and ``sentinels`` Sentinels watching it.

    ``down_after_ms`` is how long the Sentinels wait before they call a silent master
    down (Redis's default is 30 s; a test wants about one); a failover then takes about
    that plus an election (a second or two on loopback).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        password: str = "data-secret",
        sentinel_password: str = "sentinel-secret",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="dspy-fleet-sentinel-"))
        self.password = password
        self.sentinel_password = sentinel_password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.quorum = sentinels // 2 + 1
        self.nodes: list[RedisServer] = []
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_children: list[Child] = []
        self._replicas = replicas

    @property
    def url(self) -> str:
        """The fleet's Sentinel URL of database 0 (the Sentinels' password is not in it)."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://:{quote(self.password, safe='')}@{hosts}/{MASTER_NAME}/0"

    def start(self, timeout: float = 30.0) -> SentinelTopology:
        """Start the master, its replicas (in sync) and the Sentinels (each seeing all the
        others and every replica), so that a failover can be voted at once. On a failure
        every node started so far is stopped."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> SentinelTopology:
        auth = ["--masterauth", self.password]  # every node may become a replica later
        master = RedisServer(appendonly=True, password=self.password, args=auth,
                             data_dir=self._dir("master"),
                             log_path=self.workdir / "master.log").start()  # fmt: skip
        self.nodes.append(master)
        for i in range(self._replicas):
            args = [*auth, "--replicaof", "127.0.0.1", str(master.port)]
            node = RedisServer(appendonly=True, password=self.password, args=args,
                               data_dir=self._dir(f"replica{i}"),
                               log_path=self.workdir / f"replica{i}.log").start()  # fmt: skip
            self.nodes.append(node)
        for node in self.nodes[1:]:
            wait_until(functools.partial(self._linked, node), timeout, f"replica {node.port}")
        for i, port in enumerate(self.sentinel_ports):
            self.sentinel_children.append(self._start_sentinel(i, port, master.port))
        wait_until(self._sentinels_agree, timeout, "Sentinels that see each other")
        return self

    def master_port(self) -> int | None:
        """The port the Sentinels name as master now, or None when none of them answers."""
        for port in self.sentinel_ports:
            try:
                addr = cast(
                    "tuple[str, int] | None",
                    self._sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME),
                )
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        return None

    def node(self, port: int) -> RedisServer:
        """The data node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def kill_master(self) -> int:
        """``kill -9`` the current master; returns its port."""
        port = self.master_port()
        if port is None:
            raise RuntimeError("no Sentinel names a master")
        child = self.node(port).child
        assert child is not None
        child.proc.kill()
        child.proc.wait()
        return port

    def stall_replicas(self) -> None:
        """Stop replication while the master goes on accepting writes (a lagging replica,
        made long enough to see): SIGSTOP every replica, then have the master drop their
        links. Stopping alone is not enough: the master's stream still lands in the stopped
        replicas' socket buffers, and they apply it once resumed."""
        master = self.master_port()
        assert master is not None
        for node in self._replicas_now():
            assert node.child is not None
            node.child.proc.send_signal(signal.SIGSTOP)
        self._data(master).client_kill_filter(_type="replica")

    def resume_replicas(self) -> None:
        """SIGCONT every stopped data node."""
        for node in self.nodes:
            if node.child is not None and node.child.proc.poll() is None:
                node.child.proc.send_signal(signal.SIGCONT)

    def _replicas_now(self) -> list[RedisServer]:
        master = self.master_port()
        return [n for n in self.nodes if n.port != master and n.child is not None]

    def wait_promoted(self, old_port: int, timeout: float = 30.0) -> tuple[int, float]:
        """Wait until every Sentinel names a master other than ``old_port`` and that node
        answers as a master; returns (its port, seconds waited)."""
        started = time.monotonic()

        def promoted() -> bool:
            port = self.master_port()
            if port is None or port == old_port:
                return False
            try:
                role = self._data(port).execute_command("ROLE")
            except redis.RedisError:
                return False
            return bool(role) and role[0] in ("master", b"master")

        wait_until(promoted, timeout, "a promoted replica")
        port = self.master_port()
        assert port is not None
        return port, time.monotonic() - started

    def stop(self) -> None:
        """Stop every Sentinel and data node."""
        for child in self.sentinel_children:
            child.stop()
        self.sentinel_children = []
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- helpers -----------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _data(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=1,
                           socket_connect_timeout=1)  # fmt: skip

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.sentinel_password, socket_timeout=1,
                           socket_connect_timeout=1, decode_responses=True)  # fmt: skip

    def _linked(self, node: RedisServer) -> bool:
        try:
            info = self._data(node.port).info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up"

    def _start_sentinel(self, index: int, port: int, master_port: int) -> Child:
        # Sentinel rewrites its config file (it records what it learns), so each has its own.
        conf = self._dir(f"sentinel{index}") / "sentinel.conf"
        conf.write_text(
            "\n".join([
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {conf.parent}",
                f"requirepass {self.sentinel_password}",
                # Sentinels authenticate to each other with the Sentinels' password.
                f"sentinel sentinel-pass {self.sentinel_password}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {self.quorum}",
                f"sentinel auth-pass {MASTER_NAME} {self.password}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ]) + "\n"
        )  # fmt: skip
        child = Child(f"sentinel:{port}", [find_redis_server(), str(conf), "--sentinel"],
                      log_path=self.workdir / f"sentinel{index}.log")  # fmt: skip
        wait_until(lambda: self._pings(port), 20.0, f"Sentinel on port {port}", child.proc)
        return child

    def _pings(self, port: int) -> bool:
        try:
            return bool(self._sentinel(port).ping())
        except redis.RedisError:
            return False

    def _sentinels_agree(self) -> bool:
        others, replicas = len(self.sentinel_ports) - 1, len(self.nodes) - 1
        for port in self.sentinel_ports:
            try:
                state = cast(dict[str, Any], self._sentinel(port).sentinel_master(MASTER_NAME))
            except redis.RedisError:
                return False
            if int(state["num-other-sentinels"]) < others or int(state["num-slaves"]) < replicas:
                return False
        return True
