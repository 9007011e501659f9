"""A private RabbitMQ node (Debian's rabbitmq-server), and a TCP proxy to cut it off.

Never the machine's own node: the node here has its own name, ports, data, logs, config
and Erlang cookie (its HOME), all under one temporary directory, and stops with the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from kombu import Connection

from dspy_fleet.devtools.procs import Child, free_port, wait_until

# Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user (whose HOME holds the
# system node's cookie); the script under /usr/lib runs the node as the caller.
_SERVER_PATHS = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/local/sbin/rabbitmq-server")


def find_rabbitmq_server() -> str | None:
    """Path of a rabbitmq-server start script that runs as the caller, or None."""
    for path in _SERVER_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("rabbitmq-server")


class RabbitServer:
    """A rabbitmq-server node on free ports, with everything under ``base_dir``."""

    def __init__(self, base_dir: Path | None = None, *, log_path: Path | None = None) -> None:
        binary = find_rabbitmq_server()
        if binary is None:
            raise RuntimeError("no rabbitmq-server found: apt-get install rabbitmq-server")
        self.binary = binary
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = base_dir or Path(tempfile.mkdtemp(prefix="dspy-fleet-rabbitmq-"))
        self.log_path = log_path or self.dir / "rabbitmq.out"
        self.child: Child | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment the node and its CLI tools (rabbitmqctl) run with."""
        return {
            "HOME": str(self.dir / "home"),  # its own Erlang cookie
            "RABBITMQ_NODENAME": f"fleet-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),  # rabbitmq.conf
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
        }

    def url(self, vhost: str = "/", port: int | None = None) -> str:
        """The amqp:// URL of ``vhost`` (guest, which this node admits from loopback)."""
        path = "" if vhost == "/" else vhost
        return f"amqp://guest:guest@127.0.0.1:{port or self.port}/{path}"

    def start(self, timeout: float = 60.0) -> RabbitServer:
        """Start the node and wait until an AMQP connection opens."""
        for sub in ("home", "mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text("log.console = false\n")
        self.child = Child(f"rabbitmq:{self.port}", [self.binary], env=self.env,
                           log_path=self.log_path)  # fmt: skip
        wait_until(lambda: _connects(self.url()), timeout, f"rabbitmq-server on port {self.port}",
                   self.child.proc)  # fmt: skip
        return self

    def add_vhost(self, name: str) -> str:
        """Create a fresh vhost that guest may use; returns its URL."""
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return self.url(name)

    def ctl(self, *args: str) -> str:
        """Run rabbitmqctl against this node; returns its output."""
        ctl = str(Path(self.binary).with_name("rabbitmqctl"))
        done = subprocess.run([ctl, "-q", *args], env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        return done.stdout

    def stop(self) -> None:
        """Stop the node (SIGTERM to its process group, then SIGKILL)."""
        if self.child is not None:
            self.child.stop(timeout=30)
            self.child = None


def _connects(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=1) as conn:
            conn.ensure_connection(max_retries=1)
            conn.default_channel  # noqa: B018 - opening a channel proves the node serves AMQP
        return True
    except Exception:  # not up yet: any error of a half-started node
        return False


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``. ``stop()`` closes the listener and
    every open connection (clients see the broker vanish); ``start()`` listens again on
    the same port."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        """Listen and forward."""
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(128)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
