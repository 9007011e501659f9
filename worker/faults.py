"""What a failed provider call means, read from its status, the provider's own error type and
the body, through a gateway when one stands in front of the provider.

Both DSPy engines raise DSPy's ``LMError`` types (dspy/clients/errors.py), chosen from the
HTTP status and, for some providers, from documented error codes. A gateway blurs that. A
LiteLLM proxy forwards a provider's 401 as its own answer, then cools the deployment down
and answers the following calls ``429 No deployments available for selected model ...``;
other gateways wrap a provider's 4xx in a 429 or a 5xx. Judged by the status alone these
are transient faults: retried, counted against the breaker, and the real cause never shown.
So the cause is read from everything the answer carries, and the first non-transient cause
found wins over the status:

1. a non-transient class DSPy already chose (``LMAuthError``, ``LMBillingError``, an
   invalid request, which DSPy reads from the body's code on both engines);
2. the error ``type``/``code``/``status`` of the body, the provider's or the gateway's
   (``authentication_error``, ``insufficient_quota``, ``context_length_exceeded``, a
   status such as ``"401"`` inside a 429);
3. the LiteLLM exception a LiteLLM proxy names at the head of each message it forwards
   (``litellm.AuthenticationError: ...``), or an embedded ``Error code: 401``;

and only then the status: 401/403 auth, 402 billing, 408/504 timeout, 429 and 5xx
transient, any other 4xx the request. A LiteLLM cooldown answer is judged on its own, by
the statuses its ``cooldown_list`` names (some LiteLLM versions list each cooling
deployment with the exception and status that cooled it): non-transient when every one is;
otherwise a :class:`GatewayCooldownError`, which the worker traces to the cause it last saw
for the model (dspy_fleet/store/causes.py).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dspy_fleet.errors import (
    GatewayCooldownError,
    JobError,
    ProviderAuthError,
    ProviderBillingError,
    ProviderError,
    ProviderRequestError,
    ProviderTimeoutError,
)
from worker.dspy_env import litellm_module

AUTH, BILLING, REQUEST = "auth", "billing", "request"

# Error types and codes that name a non-transient cause whatever the status around them.
# Sources: OpenAI's error codes (invalid_api_key, insufficient_quota, context_length_exceeded,
# model_not_found), Anthropic's error types (authentication_error, permission_error,
# billing_error, not_found_error), Google's statuses (UNAUTHENTICATED, PERMISSION_DENIED),
# the LiteLLM proxy's error types (auth_error, expired_key, budget_exceeded), Moonshot's
# exceeded_current_quota_error (as DSPy's lm15 engine reads it). Ambiguous ones are left
# out on purpose: invalid_request_error also rides OpenAI's 401s and some 429s.
_CAUSE_OF_TOKEN = {
    "authentication_error": AUTH,
    "auth_error": AUTH,
    "invalid_api_key": AUTH,
    "expired_key": AUTH,
    "permission_error": AUTH,
    "permission_denied": AUTH,
    "unauthenticated": AUTH,
    "unauthorized": AUTH,
    "insufficient_quota": BILLING,
    "billing_error": BILLING,
    "exceeded_current_quota_error": BILLING,
    "budget_exceeded": BILLING,
    "context_length_exceeded": REQUEST,
    "model_not_found": REQUEST,
    "not_found_error": REQUEST,
    "content_policy_violation": REQUEST,
}

# The exception classes LiteLLM raises for non-transient causes; a LiteLLM proxy puts the
# class name at the head of each message it forwards ("litellm.AuthenticationError: ...").
_CAUSE_OF_CLASS = {
    "AuthenticationError": AUTH,
    "PermissionDeniedError": AUTH,
    "BudgetExceededError": BILLING,
    "ContextWindowExceededError": REQUEST,
    "ContentPolicyViolationError": REQUEST,
    "BadRequestError": REQUEST,
    "NotFoundError": REQUEST,
    "UnprocessableEntityError": REQUEST,
    "UnsupportedParamsError": REQUEST,
}
_CLASS_NAME = re.compile(r"\b(?:litellm\.)?(" + "|".join(_CAUSE_OF_CLASS) + r")\b")
# A status quoted inside a message: the OpenAI SDK's "Error code: 401 - {...}" (which LiteLLM
# keeps when it wraps an error), and a LiteLLM cooldown entry's 'status_code': '401' (the
# status that cooled that deployment down).
_SDK_STATUS = re.compile(r"\bError code: (\d{3})\b")
_COOLED_BY = re.compile(r"['\"]status_code['\"]:\s*['\"]?(\d{3})")
_COOLED_BY_EXCEPTION = re.compile(r"['\"]exception_received['\"]:\s*(['\"])(.*?)(?<!\\)\1")
# A LiteLLM router/proxy answer for a model whose deployments are all cooling down
# (litellm/types/router.py RouterErrors.no_deployments_available; since LiteLLM 1.5x the
# proxy answers it as 429 with Retry-After = the cooldown left).
_COOLDOWN = re.compile(r"No deployments available for selected model|all_deployments_in_cooldown")


def _status_cause(status: int | None) -> str | None:
    """The non-transient cause a status stands for, or None for a transient one (or none)."""
    if status is None or status == 429 or status in (408, 504) or status >= 500:
        return None
    if status in (401, 403):
        return AUTH
    if status == 402:
        return BILLING
    return REQUEST if 400 <= status < 500 else None


@dataclass
class Answer:
    """What a failed call let us see of the provider's (or the gateway's) answer."""

    status: int | None = None
    retry_after: float | None = None
    tokens: list[str] = field(default_factory=list)  # error types, codes, statuses (bodies)
    texts: list[str] = field(default_factory=list)  # the messages, outermost first
    message: str = ""  # the one to show, without DSPy's remedy hints
    body_text: int | None = None  # which of ``texts`` is the outermost body's message

    @property
    def cooldown(self) -> bool:
        """Whether this is a gateway's "every deployment is cooling down" answer."""
        return any(_COOLDOWN.search(t) for t in (*self.texts, *self.tokens))

    @property
    def cooled_by(self) -> list[int]:
        """The statuses a cooldown answer says cooled its deployments down (may be none)."""
        return [int(s) for t in self.texts for s in _COOLED_BY.findall(t)]

    @property
    def cooled_by_message(self) -> str | None:
        """The first exception a cooldown answer quotes as the reason (None: it quotes none)."""
        for text in self.texts:
            if (m := _COOLED_BY_EXCEPTION.search(text)) is not None:
                return _short(m.group(2))
        return None

    def cause(self) -> str | None:
        """The first non-transient cause the answer carries, or None (the status decides)."""
        if self.cooldown:
            # Non-transient only if every deployment cooled for one: a deployment cooling
            # after a rate limit will be back when its cooldown ends.
            causes = [_status_cause(s) for s in self.cooled_by]
            return causes[0] if causes and all(causes) else None
        for token in self.tokens:
            cause = _CAUSE_OF_TOKEN.get(token.lower())
            if cause is None and token.isdecimal():
                cause = _status_cause(int(token))
            if cause is not None:
                return cause
        for text in self.texts:
            if (m := _CLASS_NAME.search(text)) is not None:
                return _CAUSE_OF_CLASS[m.group(1)]
            quoted = [*_SDK_STATUS.findall(text), *_COOLED_BY.findall(text)]
            for cause in map(_status_cause, map(int, quoted)):
                if cause is not None:
                    return cause
        return _status_cause(self.status)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from (DSPy's error, LiteLLM's, the SDK's)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _body(value: Any) -> dict[str, Any] | None:
    """The error object of a body: ``{"error": {...}}`` or the inner object itself."""
    if isinstance(value, bytes | str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    inner = value.get("error")
    return inner if isinstance(inner, dict) else value


def _first_paragraph(text: str) -> str:
    # DSPy's lm15 engine appends remedies ("To fix: - Wait a moment and retry ...") after
    # a blank line; they speak to a DSPy user, not to a client of this service.
    return text.split("\n\n", 1)[0].strip()


def read_answer(exc: Exception, status: int | None, retry_after: float | None) -> Answer:
    """Everything the exception chain of a failed call says of the answer it got."""
    answer = Answer(status=status, retry_after=retry_after)
    for link in _chain(exc):
        code = getattr(link, "provider_code", None)  # DSPy's: the body's code, else its type
        if isinstance(code, str) and code:
            answer.tokens.append(code)
        body = _body(getattr(link, "body", None))  # LiteLLM's and the OpenAI SDK's
        if body is not None:
            for key in ("type", "code", "status"):
                value = body.get(key)
                if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                    answer.tokens.append(str(value))
            if isinstance(body.get("message"), str):
                if answer.body_text is None:
                    answer.body_text = len(answer.texts)
                answer.texts.append(body["message"])
        text = getattr(link, "message", None)
        answer.texts.append(text if isinstance(text, str) else str(link))
    # What to show: the body's own message (what the provider or the gateway said) rather
    # than the wrappers' prose around it.
    said = (
        answer.texts[answer.body_text]
        if answer.body_text is not None
        else (answer.texts[0] if answer.texts else str(exc))
    )
    answer.message = _short(_first_paragraph(said))
    return answer


_REFUSED = {AUTH: "the provider refused the credentials",
            BILLING: "the provider refused for billing or quota"}  # fmt: skip


def _error_for(answer: Answer, *, transient: bool, cause: str | None = None) -> JobError:
    """Our error for an answer: its non-transient cause (``cause``, when the caller knows
    it already, else the answer's) if it has one; else a transient fault when ``transient``
    (a 429, a 5xx), a rejected request when not."""
    status, said = answer.status, answer.message
    details = answer_details(answer)
    cause = cause or answer.cause()
    if cause is not None and answer.cooldown:
        # The reason the gateway cooled down is the message, not "no deployments available".
        details["gateway_cooldown"] = True
        cooled = answer.cooled_by_message or f"status {answer.cooled_by[0]}"
        said = f"; the gateway answers {status} while it cools the model down after: {cooled}"
    elif cause is not None and status not in (None, 401, 402, 403) and cause != REQUEST:
        said = f" (the gateway answered {status}): {said}"
    else:
        said = f" ({status}): {said}" if status else f": {said}"
    if cause in _REFUSED:
        error = ProviderAuthError if cause == AUTH else ProviderBillingError
        return error(_REFUSED[cause] + said, details=details)
    if cause == REQUEST or not transient:
        return ProviderRequestError("provider rejected the request" + said, details=details)
    if answer.cooldown and not answer.cooled_by:
        return GatewayCooldownError(
            "the gateway has every deployment of the model cooling down" + said,
            status_code=status, retry_after=answer.retry_after,
            details={**details, "gateway_cooldown": True},
        )  # fmt: skip
    return ProviderError("provider failed" + said, status_code=status,
                         retry_after=answer.retry_after, details=details)  # fmt: skip


def _from_dspy(exc: Exception) -> JobError | None:
    """DSPy ≥ 3.4 wraps provider failures in its own LMError types, with status and Retry-After."""
    from dspy.utils import exceptions as dx

    if not isinstance(exc, dx.LMError):
        return None
    status = getattr(exc, "status", None)
    retry_after = getattr(exc, "retry_after", None)
    retry_after = float(retry_after) if retry_after is not None else None
    answer = read_answer(exc, status if isinstance(status, int) else None, retry_after)
    if isinstance(exc, dx.LMTimeoutError):
        return ProviderTimeoutError(f"provider timed out: {answer.message}", status_code=status,
                                    details=answer_details(answer))  # fmt: skip
    if isinstance(exc, dx.LMTransportError):
        if _timed_out(exc):  # DSPy's engine reports its read timeout as a transport error
            return ProviderTimeoutError(f"provider timed out: {answer.message}",
                                        details=answer_details(answer))  # fmt: skip
        return ProviderError(f"cannot reach provider: {answer.message}",
                             details=answer_details(answer))  # fmt: skip
    if not isinstance(exc, dx.LMProviderError):
        return None  # configuration, unexpected engine failures: not the provider's answer
    # DSPy's non-transient classes are causes already (from the status or a documented code).
    cause = None
    if isinstance(exc, dx.LMAuthError):
        cause = AUTH
    elif isinstance(exc, dx.LMBillingError):
        cause = BILLING
    elif isinstance(exc, dx.LMInvalidRequestError):
        cause = REQUEST
    # A DSPy rate-limit or server error is transient unless the answer says otherwise; any
    # other provider error without such a status is the request's.
    transient = isinstance(exc, dx.LMRateLimitError | dx.LMServerError) or (
        isinstance(status, int) and (status == 429 or status >= 500)
    )
    return _error_for(answer, transient=transient, cause=cause)


# The transports' timeout classes (lm15's and httpx's) that do not derive from TimeoutError.
_TIMEOUT_CLASSES = {"ReadTimeout", "WriteTimeout", "ConnectTimeout", "PoolTimeout", "Timeout"}


def _timed_out(exc: BaseException) -> bool:
    """Whether a transport failure was a timeout (connect, read or write), at any depth."""
    return any(isinstance(link, TimeoutError) or type(link).__name__ in _TIMEOUT_CLASSES
               for link in _chain(exc))  # fmt: skip


def answer_details(answer: Answer) -> dict[str, Any]:
    """The details an error carries about the answer (its status, when there was one)."""
    return {"status_code": answer.status} if answer.status else {}


def map_provider_error(exc: Exception) -> JobError | None:
    """Our error for an exception raised by an LM call, or None if it is not one."""
    mapped = _from_dspy(exc)
    if mapped is not None:
        return mapped
    if "litellm" not in sys.modules:
        return None  # nothing below can match: litellm was never loaded
    # LiteLLM's own exceptions, as an older DSPy (or a direct LiteLLM call) raises them.
    litellm = litellm_module()
    if isinstance(exc, litellm.exceptions.Timeout):
        return ProviderTimeoutError(f"provider timed out: {_short(exc)}", status_code=408)
    if isinstance(exc, litellm.exceptions.APIConnectionError):
        return ProviderError(f"cannot reach provider: {_short(exc)}")
    if not isinstance(exc, litellm.exceptions.OpenAIError | litellm.exceptions.APIError):
        return None
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    answer = read_answer(exc, status, _retry_after(exc))
    return _error_for(answer, transient=status is None or status == 429 or status >= 500)


def _retry_after(exc: Exception) -> float | None:
    """Seconds the provider asked to wait: OpenAI's ``retry-after-ms`` (exact) when given,
    else ``Retry-After`` (whole seconds; an HTTP date is not parsed: None)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    if not hasattr(headers, "get"):
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / scale
        except ValueError:
            continue
    return None


def _short(exc: Exception | str, limit: int = 300) -> str:
    text = exc if isinstance(exc, str) else str(getattr(exc, "message", None) or exc)
    return text if len(text) <= limit else text[:limit] + "…"
