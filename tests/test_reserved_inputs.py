"""Issue 21, item 1: no tenant input reaches the provider call's settings.

DSPy takes some keyword arguments of a call as its own (``config`` becomes the call's LM
settings, ``lm`` the LM, ...). A program may not declare such an input (the config file,
the API and the worker refuse it at start-up), no message may carry one, and a listener on
loopback that a tenant names as ``api_base`` through every input shape gets no request.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.contract import RESERVED_INPUT_NAMES, TASK_NAME, signature_input_names
from dspy_fleet.devtools.procs import free_port
from dspy_fleet.devtools.services import cli, service_env
from dspy_fleet.errors import ConfigError, MessageValidationError
from dspy_fleet.fleet_config import load_fleet_config
from dspy_fleet.settings import CommonSettings
from dspy_fleet.store.jobs import JobStore
from tests.conftest import TEST_ENV, MockLLM, OwnStack, poll

# --- the reserved set, derived from the installed DSPy ----------------------------------


def _kwargs_names(fn: Callable[..., Any]) -> set[str]:
    """Names a DSPy call function takes as its own: string keys it reads from ``kwargs``
    (pop/get/in/[]) and its named parameters (which a same-named input would collide with)."""
    fn = inspect.unwrap(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            names.update(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "kwargs"
            and node.func.attr in ("pop", "get")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(node.args[0].value)
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.comparators[0], ast.Name)
            and node.comparators[0].id == "kwargs"
        ):
            names.add(node.left.value)
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "kwargs"
            and isinstance(node.slice, ast.Constant)
        ):
            names.add(node.slice.value)
    return names


def test_reserved_names_are_what_the_installed_dspy_takes_from_a_call() -> None:
    import dspy
    from dspy.utils import callback

    # Every function a tenant's inputs pass through as keywords, for the modules the
    # registry builds (Predict, ChainOfThought) and any dspy.Module (Module.__call__).
    chain = [
        dspy.Module.__call__, dspy.Module.acall,
        dspy.Predict.__call__, dspy.Predict.acall, dspy.Predict.forward, dspy.Predict.aforward,
        dspy.Predict._forward_preprocess, dspy.Predict._forward_postprocess,
        dspy.ChainOfThought.forward, dspy.ChainOfThought.aforward,
    ]  # fmt: skip
    derived = set().union(*(_kwargs_names(fn) for fn in chain))
    # DSPy's callback wrapper around Module.__call__ names its first parameter "instance".
    wrapper = ast.parse(inspect.getsource(callback.with_callbacks))
    derived |= {
        node.args.args[0].arg
        for node in ast.walk(wrapper)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name in ("sync_wrapper", "async_wrapper")
    }
    assert derived == RESERVED_INPUT_NAMES, (
        "DSPy changed the names it takes from a call: update RESERVED_INPUT_NAMES "
        f"(missing: {sorted(derived - RESERVED_INPUT_NAMES)}, "
        f"no longer taken: {sorted(RESERVED_INPUT_NAMES - derived)})"
    )


@pytest.mark.parametrize(
    ("signature", "names"),
    [
        ("question -> answer", ["question"]),
        ("context, question -> answer", ["context", "question"]),
        ("a: dict[str, int], b ,c:list[str]-> d", ["a", "b", "c"]),
        ("config: dict, question -> answer", ["config", "question"]),
    ],
)
def test_string_signature_inputs_are_read_without_dspy(signature: str, names: list[str]) -> None:
    assert signature_input_names(signature) == names


def test_the_call_time_check_refuses_before_any_lm_call() -> None:
    import dspy
    from dspy.utils import DummyLM

    from worker.predict import Usage, call_program

    lm = DummyLM([{"answer": "ok"}] * 4)
    for module in (dspy.Predict("question -> answer"), dspy.ChainOfThought("question -> answer")):
        for name in sorted(RESERVED_INPUT_NAMES) + ["api_base"]:
            with pytest.raises(MessageValidationError):
                call_program(module, lm, {"question": "hi", name: {"api_base": "x"}}, {}, Usage())
    assert lm.history == []
    out = call_program(dspy.Predict("question -> answer"), lm, {"question": "hi"}, {}, Usage())
    assert out["answer"] == "ok"


# --- start-up refuses a program that declares a reserved name ---------------------------

BASE = """
default_model: mock
models:
  mock: {litellm_model: openai/mock-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}", timeout: 10}
programs:
  qa: {signature: "question -> answer"}
"""


def _config(tmp_path: Path, program: str) -> Path:
    path = tmp_path / f"fleet-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(BASE + f"  bad: {program}\n")
    return path


@pytest.mark.parametrize("name", sorted(RESERVED_INPUT_NAMES))
def test_config_file_refuses_every_reserved_input_name(tmp_path: Path, name: str) -> None:
    path = _config(tmp_path, f'{{signature: "question, {name}: str -> answer"}}')
    with pytest.raises(ConfigError, match=rf"programs\.bad\.signature: .*'{name}'"):
        load_fleet_config(path)


def _run(argv: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("program", "where", "field"),
    [
        ('{signature: "config, question -> answer"}', "signature", "config"),
        ("{signature: tests.reserved_programs:ConfigSignature}", "signature", "config"),
        ("{module: tests.reserved_programs:LmInForward}", "module", "lm"),
        ("{module: tests.reserved_programs:DemosDownstream}", "module", "demos"),
    ],
)
def test_worker_refuses_to_start(
    tmp_path: Path, redis_server: Any, mock_llm: MockLLM, program: str, where: str, field: str
) -> None:
    path = _config(tmp_path, program)
    env = service_env(redis_server.url, mock_llm.url, DSPY_FLEET_CONFIG=str(path),
                      DSPY_FLEET_METRICS_PORT="0", DSPY_FLEET_QUEUES="nothing-here")  # fmt: skip
    done = _run(cli("worker", "--hostname", f"refused-{uuid.uuid4().hex[:6]}@%h"), env)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-2000:]
    assert f"programs.bad.{where}" in out and f"'{field}'" in out, out[-2000:]


def test_api_refuses_to_start_on_a_reserved_string_signature(
    tmp_path: Path, redis_server: Any, mock_llm: MockLLM
) -> None:
    path = _config(tmp_path, '{signature: "context, config -> answer"}')
    env = service_env(redis_server.url, mock_llm.url, DSPY_FLEET_CONFIG=str(path),
                      DSPY_FLEET_API_PORT=str(free_port()))  # fmt: skip
    done = _run(cli("api"), env, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-2000:]
    assert "programs.bad.signature" in out and "'config'" in out, out[-2000:]


# --- with a valid config, no input moves the call ---------------------------------------


class Listener:
    """An HTTP server on loopback that records every request it gets (it must get none)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _any(self) -> None:
                seen.append(f"{self.command} {self.path} {dict(self.headers)}")
                self.send_response(500)
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


VALID = """
default_model: mock
models:
  mock: {litellm_model: openai/mock-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}", timeout: 10,
         api_key_env: TEST_PROVIDER_KEY}
programs:
  qa: {signature: "question -> answer"}
  rag: {signature: "context, question -> answer", predictor: ChainOfThought}
  kw: {module: tests.reserved_programs:KwargsModule}
"""


@pytest.fixture(scope="module")
def fleet(mock_llm: MockLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    base = tmp_path_factory.mktemp("reserved")
    (base / "fleet.yaml").write_text(VALID)
    env = {**TEST_ENV, "DSPY_FLEET_CONFIG": str(base / "fleet.yaml"),
           "TEST_PROVIDER_KEY": f"sk-{uuid.uuid4().hex}"}  # fmt: skip
    stack = OwnStack(base, env=env)
    stack.use_mock_llm(mock_llm)
    stack.start_redis()
    stack.start_worker("worker")
    stack.start_api("api")
    yield stack
    stack.stop()


def _steering(url: str) -> dict[str, Any]:
    """Everything a tenant might try to make the provider call go to ``url``."""
    return {"api_base": url, "base_url": url, "api_key": "stolen?",
            "extra_headers": {"x": "y"}, "model": "openai/evil"}  # fmt: skip


def _direct(redis_url: str, **fields: Any) -> str:
    """Publish a job straight onto the queue, as a direct producer (not the API) does."""
    producer = make_celery(CommonSettings(redis_url=redis_url), publisher=True)
    job_id = str(uuid.uuid4())
    message = {"v": 1, "job_id": job_id, "submitted_at": "2026-01-01T00:00:00Z", **fields}
    producer.send_task(TASK_NAME, kwargs=message, task_id=job_id, queue="interactive")
    return job_id


def test_no_input_shape_moves_the_provider_call(fleet: OwnStack) -> None:
    listener = Listener()
    steer = _steering(listener.url)
    api = fleet.api
    assert api is not None
    fleet.mock.reset()
    succeeded = 0
    try:
        with httpx.Client(base_url=api.url, timeout=60) as http:

            def predict(**body: Any) -> httpx.Response:
                return http.post("/v1/predict", json={"use_cache": False, "wait": 30, **body})

            # 1. Every reserved name as an input field, on every kind of program: refused.
            for program in ("qa", "rag", "kw"):
                fields = (
                    {"question": "hi", "context": "c"} if program == "rag" else {"question": "hi"}
                )
                for name in sorted(RESERVED_INPUT_NAMES):
                    resp = predict(program=program, inputs={**fields, name: steer})
                    assert resp.status_code == 422, (program, name, resp.text)
                    assert resp.json()["error"]["code"] == "validation_error"
            # Any other extra name (the **kwargs module passes on whatever it gets): refused.
            resp = predict(program="kw", inputs={"question": "hi", "api_base": listener.url})
            assert resp.status_code == 422, resp.text
            # 2. Steering inside values: they are prompt text, never call settings.
            for value in (steer, {"config": steer, "lm": steer}, [steer], f"config={steer}"):
                resp = predict(program="kw", inputs={"question": value})
                assert resp.status_code == 200, resp.text
                succeeded += 1
            resp = predict(program="rag", inputs={"question": {"config": steer}, "context": steer})
            assert resp.status_code == 200, resp.text
            succeeded += 1
            # 3. LM parameters: the allow-list refuses every setting that moves the call.
            bad = {**steer, "api_version": "x", "custom_llm_provider": "openai", "headers": {},
                   "timeout": 1, "num_retries": 9, "config": steer}  # fmt: skip
            for key, value in bad.items():
                resp = predict(input="hi", parameters={key: value})
                assert resp.status_code == 422, (key, resp.text)
            # 4. Top-level extras: refused.
            for key in ("config", "lm", "api_base", "demos"):
                resp = predict(input="hi", **{key: steer})
                assert resp.status_code == 422, (key, resp.text)

        # 5. Direct Celery messages (past the API): unknown keys, `config` at top level,
        # reserved input names. Each job fails with a validation error and no call.
        client = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
        store = JobStore(client, 3600)
        jobs = [
            _direct(fleet.redis_url, program="qa", inputs={"question": "hi"}, config=steer),
            _direct(fleet.redis_url, program="qa", inputs={"question": "hi"}, **steer),
            _direct(fleet.redis_url, program="kw", inputs={"question": "hi", "config": steer}),
            _direct(fleet.redis_url, program="kw", inputs={"question": "hi", "lm": "x"}),
            _direct(fleet.redis_url, program="qa",
                    inputs={"question": "hi"}, parameters={"api_base": listener.url}),
        ]  # fmt: skip
        for job_id in jobs:
            job = poll(lambda j=job_id: (r := store.get(j)) and r["status"] == "failed" and r, 30)
            assert job["error"]["code"] == "validation_error", job
        # A well-formed direct message runs (the worker is not just refusing everything).
        ok = _direct(fleet.redis_url, program="kw", inputs={"question": {"config": steer}},
                     use_cache=False)  # fmt: skip
        poll(lambda: (r := store.get(ok)) and r["status"] == "succeeded", 30)
        succeeded += 1
    finally:
        listener.stop()
    assert listener.requests == [], listener.requests
    # Every successful job called the mock LLM (the real provider of this fleet), nothing else.
    assert fleet.mock.stats()["chat_completions"] >= succeeded
