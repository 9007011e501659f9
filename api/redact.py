"""Redaction of secrets for anything the service shows about itself (/config, logs).

Masks by structure, not by a list of known settings: whatever the config holds, a
secret hides in one of a few places, and each is masked wherever it appears:

- a value whose key looks like a secret (``password``, ``api-key``, ``X-Auth-Token`` ...);
- any value of a ``headers`` mapping (``headers``, ``extra_headers`` ...): a header's
  name says nothing about whether its value is a credential;
- the userinfo of any URL (``scheme://user:pw@host``), in any string, anywhere;
- a URL query or fragment value whose key looks like a secret (``?password=``, which
  redis-py honours, ``?api-key=``, ``&sig=``).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

MASK = "***"

# Names that are a secret when they are a whole word of a key (x-api-key, auth_token, pass).
_SECRET_WORDS = frozenset({"pass", "pwd", "key", "keys", "auth", "apikey", "password", "passwd",
                           "secret", "token", "credential", "credentials", "cookie",
                           "authorization"})  # fmt: skip
# ... and those that are one even glued to other words (clientsecret, accesstoken, xapikey).
_SECRET_PARTS = ("password", "passwd", "secret", "token", "credential", "apikey", "authoriz",
                 "authent", "cookie", "privatekey")  # fmt: skip
# Secret only as a URL parameter (a signed URL's ``sig=``): in the config a program's
# ``signature`` is its DSPy signature, which admins need to see.
_QUERY_WORDS = frozenset({"sig", "signature"})
# camelCase and separators: "X-Api-Key", "api_key", "apiKey", "auth.token".
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# A URL anywhere in a string, up to whitespace, a quote, or a comma starting another URL.
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_URL = re.compile(rf"{_SCHEME}[^\s\"'<>]*?(?=,{_SCHEME}|[\s\"'<>]|$)")


def secret_name(name: str, *, in_url: bool = False) -> bool:
    """Whether a key (or, ``in_url``, a URL parameter) name looks like it holds a secret."""
    words = [w.lower() for w in _WORD.findall(name)]
    if any(w in _SECRET_WORDS or (in_url and w in _QUERY_WORDS) for w in words):
        return True
    glued = "".join(words)
    return any(part in glued for part in _SECRET_PARTS)


def _mask_pairs(text: str) -> str:
    """``a=1&password=x``: the value of every secret-looking key masked, the rest verbatim."""
    out = []
    for pair in re.split(r"([&;])", text):
        name, eq, _ = pair.partition("=")
        secret = eq and secret_name(unquote_plus(name), in_url=True)
        out.append(f"{name}={MASK}" if secret else pair)
    return "".join(out)


def redact_url(url: str | None) -> str | None:
    """A URL with its userinfo and secret-looking query (and fragment) values masked.

    Works on the text itself rather than parse-and-rebuild, so everything that is not a
    secret stays byte for byte as configured (``amqp://h//``, empty queries, odd ports).
    """
    if not url or "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    end = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if i != -1:
            end = min(end, i)
    netloc, tail = rest[:end], rest[end:]
    if "@" in netloc:
        # Username and password alike: a token is often sent as the username.
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    tail, hash_, fragment = tail.partition("#")
    path, q, query = tail.partition("?")
    if query:
        query = _mask_pairs(query)
    if fragment and "=" in fragment:
        fragment = _mask_pairs(fragment)
    return f"{scheme}://{netloc}{path}{q}{query}{hash_}{fragment}"


def redact_text(text: str) -> str:
    """``text`` with every URL inside it redacted (see :func:`redact_url`)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)) or "", text)


def _is_headers(key: str) -> bool:
    return key.lower().replace("-", "_").endswith("headers")


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` with every secret masked by structure (see the module doc)."""
    if key.endswith("_env") and isinstance(value, str):
        return value  # the *name* of a variable holding a secret, not the secret
    if secret_name(key) and value not in (None, "", {}, []):
        return MASK
    if isinstance(value, dict):
        if _is_headers(key):
            # Every header value: X-Custom-Whatever may well carry a credential.
            return {k: MASK if v not in (None, "") else v for k, v in value.items()}
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if _is_headers(key):
            return [_redact_header_item(item) for item in value]
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _redact_header_item(item: Any) -> Any:
    """One header given as ``[name, value]`` or ``"Name: value"``: the value masked."""
    if isinstance(item, list | tuple) and len(item) == 2:
        return [item[0], MASK]
    if isinstance(item, str) and ":" in item:
        return f"{item.split(':', 1)[0]}: {MASK}"
    return MASK
