"""Deterministic assistant replies to DSPy ChatAdapter / JSONAdapter prompts; no I/O."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

# DSPy's adapters describe the signature in the system prompt, one numbered line per field:
#   Your output fields are:
#   1. `answer` (int): optional description
_SECTION = r"Your {kind} fields are:\n(.*?)(?=\nYour \w+ fields are:|\nAll interactions will be|\Z)"
_FIELD_LINE = re.compile(r"^\d+\. `(?P<name>\w+)` \((?P<type>.+?)\):(?: |$)", re.M)
# The structure section adds a hint per typed field: "{answer}        # note: the value ..."
_NOTE_LINE = re.compile(r"\{(?P<name>\w+)\}\s+# note: the value you produce (?P<note>.*)")
_JSON_BLOCK = re.compile(
    r"Outputs will be a JSON object with the following fields\.\n\n(\{.*?\n\})", re.S
)
_MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]\n")
_EXPR = r"[-+*/x×÷^().\d\s]*\d[-+*/x×÷^().\d\s]*?"
_ARITHMETIC = re.compile(rf"\bwhat(?:'s|\s+is)\s+({_EXPR})\s*(?:[?!=]|$)", re.I | re.M)
_REASONING_NAMES = ("reasoning", "rationale", "thought", "explanation", "justification")


@dataclass(frozen=True)
class OutputField:
    """One output field DSPy asks for: its name, type as rendered by DSPy, and type note."""

    name: str
    type: str = "str"
    note: str = ""


@dataclass(frozen=True)
class Reply:
    """The assistant text for one choice, with OpenAI-style token usage."""

    content: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


def text_of(content: Any) -> str:
    """Return the text of a message `content` (a string or a list of OpenAI content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def count_tokens(text: str) -> int:
    """Approximate tokens as ceil(chars / 4), at least 1."""
    return max(1, math.ceil(len(text) / 4))


def parse_fields(system: str, kind: str = "output") -> list[OutputField]:
    """Read DSPy's `Your <kind> fields are:` list (with type notes) from a system prompt."""
    section = re.search(_SECTION.format(kind=kind), system, re.S)
    if not section:
        return []
    notes = {m["name"]: m["note"] for m in _NOTE_LINE.finditer(system)}
    block = _JSON_BLOCK.search(system)
    if block:  # JSONAdapter puts the notes inside JSON string values
        try:
            for value in json.loads(block[1]).values():
                if isinstance(value, str) and (m := _NOTE_LINE.match(value)):
                    notes[m["name"]] = m["note"]
        except ValueError:
            pass
    return [
        OutputField(m["name"], m["type"].strip(), notes.get(m["name"], ""))
        for m in _FIELD_LINE.finditer(section[1])
    ]


def input_values(user: str) -> dict[str, str]:
    """Split a DSPy user message into `{field: value}` by its `[[ ## field ## ]]` markers."""
    parts = _MARKER.split(user)
    values = {name: value.strip() for name, value in zip(parts[1::2], parts[2::2], strict=True)}
    if values:
        # The last section runs into DSPy's closing instruction ("Respond with ...").
        last = next(reversed(values))
        values[last] = re.split(r"\n\nRespond with ", values[last])[0].strip()
    return values


# Safe arithmetic: parse with `ast` and walk a tiny whitelist; nothing is ever evaluated.
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _evaluate(node: ast.AST) -> float:
    """Evaluate a whitelisted arithmetic AST node."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return cast(float, node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        # Bound the work a request can ask for (9**9**9 would take forever).
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        if max(abs(left), abs(right)) > 1e15:
            raise ValueError("operand too large")
        return _BINARY[type(node.op)](left, right)
    raise ValueError(f"unsupported: {type(node).__name__}")


def solve_arithmetic(text: str) -> int | float | None:
    """Answer a simple 'What is 12 * 3?' found in `text`, or None."""
    for match in _ARITHMETIC.finditer(text):
        expr = match[1].strip().replace("×", "*").replace("÷", "/").replace("^", "**")
        expr = re.sub(r"(?<=[\d)\s])x(?=[\d(\s])", "*", expr)
        if len(expr) > 200:
            continue
        try:
            value = _evaluate(ast.parse(expr, mode="eval").body)
        except (SyntaxError, ValueError, ArithmeticError, TypeError):
            continue
        if isinstance(value, float):
            if not math.isfinite(value):
                continue
            value = int(value) if value.is_integer() else round(value, 6)
        return value
    return None


class _Values:
    """Deterministic values for output fields, derived from one conversation digest."""

    def __init__(self, digest: str, snippet: str, number: int | float | None) -> None:
        self.digest, self.snippet, self.number = digest, snippet, number

    def _hash(self, *path: object) -> int:
        key = ":".join([self.digest, *map(str, path)])
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")

    def text(self, name: str) -> str:
        """A top-level string value."""
        tag = f"{self._hash(name):016x}"[:8]
        if self.number is not None:
            if name.lower() in _REASONING_NAMES:
                return f"Mock {name} {tag}: the arithmetic works out to {self.number}."
            return str(self.number)
        return f"Mock {name} {tag}: {self.snippet}"

    def for_field(self, field: OutputField) -> Any:
        """A value of the field's type, preferring DSPy's exact JSON schema when it gives one."""
        type_ = field.type
        if type_.startswith("Literal["):
            return self.for_type(type_, field.name)
        if "JSON schema: " in field.note:
            try:
                schema = json.loads(field.note.split("JSON schema: ", 1)[1])
            except ValueError:
                schema = None
            if isinstance(schema, dict):
                return self.from_schema(schema, schema.get("$defs", {}), (field.name,))
        if "one of: " in field.note:  # enums: "must be one of: red; blue"
            options = field.note.split("one of: ", 1)[1].split("; ")
            return options[self._hash(field.name) % len(options)]
        return self.for_type(type_, field.name)

    def for_type(self, type_: str, name: str, depth: int = 0) -> Any:
        """A value for a DSPy-rendered type string such as `list[str]` or `Literal['a', 'b']`."""
        head, _, rest = type_.partition("[")
        args = _split_args(rest[:-1]) if rest.endswith("]") else []
        h = self._hash(name, type_, depth)
        if head in ("Optional", "Union") and args:
            args = [a for a in args if a not in ("None", "NoneType")] or ["str"]
            return self.for_type(args[0], name, depth + 1)
        if head == "Literal" and args:
            options = [_literal(a) for a in args]
            return options[h % len(options)]
        if head.lower() in ("list", "set", "frozenset", "sequence") and depth < 4:
            item = args[0] if args else "str"
            return [self.for_type(item, f"{name}.{i}", depth + 1) for i in range(2 + h % 2)]
        if head.lower() == "tuple" and args and depth < 4:
            if len(args) == 2 and args[1] == "...":
                args = args[:1] * 2
            return [self.for_type(a, f"{name}.{i}", depth + 1) for i, a in enumerate(args)]
        if head.lower() == "dict" and depth < 4:
            value_type = args[1] if len(args) == 2 else "str"
            return {f"key{i}": self.for_type(value_type, f"{name}.{i}", depth + 1) for i in (1, 2)}
        if type_ == "int":
            return int(self.number) if self.number is not None and depth == 0 else h % 1000
        if type_ == "float":
            return float(self.number) if self.number is not None and depth == 0 else h % 10000 / 100
        if type_ == "bool":
            return bool(h % 2)
        return self.text(name) if depth == 0 else f"mock-{h:016x}"[:13]

    def from_schema(self, schema: dict, defs: dict, path: tuple) -> Any:
        """A value matching a (pydantic-generated) JSON schema."""
        h = self._hash(*path)
        if len(path) > 8:
            return None
        if "$ref" in schema:
            return self.from_schema(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs, path)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][h % len(schema["enum"])]
        for key in ("anyOf", "oneOf", "allOf"):
            options = [s for s in schema.get(key, []) if s.get("type") != "null"]
            if options:
                return self.from_schema(options[0], defs, path)
        kind = schema.get("type", "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            props = schema.get("properties") or {}
            if props:
                return {k: self.from_schema(v, defs, (*path, k)) for k, v in props.items()}
            extra = schema.get("additionalProperties")
            item = extra if isinstance(extra, dict) else {"type": "string"}
            return {f"key{i}": self.from_schema(item, defs, (*path, i)) for i in (1, 2)}
        if kind == "array":
            if schema.get("prefixItems"):
                return [
                    self.from_schema(s, defs, (*path, i))
                    for i, s in enumerate(schema["prefixItems"])
                ]
            count = max(schema.get("minItems", 2), min(schema.get("maxItems", 2), 2))
            items = schema.get("items")
            each: dict[str, Any] = items if isinstance(items, dict) else {}
            return [self.from_schema(each, defs, (*path, i)) for i in range(count)]
        if kind == "integer":
            return int(self.number) if self.number is not None and len(path) == 1 else h % 1000
        if kind == "number":
            return (
                float(self.number)
                if self.number is not None and len(path) == 1
                else h % 10000 / 100
            )
        if kind == "boolean":
            return bool(h % 2)
        if kind == "null":
            return None
        fmt = schema.get("format")
        if fmt == "date-time":
            return f"2024-01-{1 + h % 28:02d}T12:00:00Z"
        if fmt == "date":
            return f"2024-01-{1 + h % 28:02d}"
        if fmt == "uuid":
            hexed = f"{h:016x}" * 2
            return f"{hexed[:8]}-{hexed[8:12]}-4{hexed[13:16]}-8{hexed[17:20]}-{hexed[20:32]}"
        return self.text(path[0]) if len(path) == 1 else f"mock-{h:016x}"[:13]


def _split_args(text: str) -> list[str]:
    """Split `a, dict[b, c], 'x, y'` at top-level commas."""
    args, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return [*args, tail] if tail else args


def _literal(text: str) -> Any:
    """Parse one Literal option (`'a'`, `3`, `True`), falling back to the raw text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _render_chat(fields: list[OutputField], values: dict[str, Any]) -> str:
    """Render values in ChatAdapter's `[[ ## field ## ]]` format."""
    out = []
    for field in fields:
        value = values[field.name]
        shown = value if isinstance(value, str) else json.dumps(value)
        out.append(f"[[ ## {field.name} ## ]]\n{shown}\n\n")
    return "".join(out) + "[[ ## completed ## ]]"


def _schema_fields(response_format: Any) -> list[OutputField]:
    """Fields from an OpenAI `json_schema` response_format, when the prompt has none."""
    if not isinstance(response_format, dict):
        return []
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return []
    return [
        OutputField(
            k, "schema", "JSON schema: " + json.dumps({**v, "$defs": schema.get("$defs", {})})
        )
        for k, v in props.items()
        if isinstance(v, dict)
    ]


def demo_casing(messages: list[dict[str, Any]], texts: list[str]) -> set[str]:
    """The output fields that every few-shot demo writes in capitals.

    DSPy's ChatAdapter sends each demo as a user turn and an assistant turn before the
    real question; the mock imitates one trait of them, as a model would: a string field
    whose every demo value (with letters) is upper case is answered in upper case too.
    """
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    seen: dict[str, list[str]] = {}
    for i, (message, text) in enumerate(zip(messages, texts, strict=True)):
        if i < last_user and message.get("role") == "assistant":
            for name, value in input_values(text).items():
                if name != "completed" and any(c.isalpha() for c in value):
                    seen.setdefault(name, []).append(value)
    return {name for name, values in seen.items() if all(v.isupper() for v in values)}


def respond(body: dict[str, Any], choice_index: int = 0) -> Reply:
    """Build the deterministic reply for an OpenAI chat-completions request body."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    texts = [text_of(m.get("content")) for m in messages]
    conversation = json.dumps([[m.get("role"), t] for m, t in zip(messages, texts, strict=True)])
    if choice_index:
        conversation += f"#choice{choice_index}"
    digest = hashlib.sha256(conversation.encode()).hexdigest()

    system = "\n".join(t for m, t in zip(messages, texts, strict=True) if m.get("role") == "system")
    user = next(
        (
            t
            for m, t in zip(reversed(messages), reversed(texts), strict=True)
            if m.get("role") == "user"
        ),
        "",
    )
    fields = parse_fields(system) or parse_fields("\n".join(texts))
    response_format = body.get("response_format")
    fields = fields or _schema_fields(response_format)
    inputs = input_values(user)
    last_input = next(reversed(inputs.values()), None) if inputs else user
    # Keep echoed input on one line and free of markers, so it cannot break DSPy's parser.
    snippet = re.sub(r"\s+", " ", last_input or "").replace("[[", "[").strip()[:60]
    number = solve_arithmetic("\n".join(inputs.values()) if inputs else user)
    values = _Values(digest, snippet, number)

    if not fields:
        content = str(number) if number is not None else f"Mock response {digest[:8]}: {snippet}"
    else:
        data = {f.name: values.for_field(f) for f in fields}
        for name in demo_casing(messages, texts) & data.keys():
            if isinstance(data[name], str):
                data[name] = data[name].upper()
        wants_json = "Outputs will be a JSON object" in system or (
            isinstance(response_format, dict) and response_format.get("type") != "text"
        )
        content = json.dumps(data) if wants_json else _render_chat(fields, data)
    return Reply(content, count_tokens("".join(texts)), count_tokens(content))
