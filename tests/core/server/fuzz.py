"""A seeded mutation fuzzer for the server's JSON routes.

It starts from valid bodies for ``/v1/completions``, ``/v1/chat/completions``,
``/tokenize`` and ``/detokenize``, applies one mutation to each (wrong types, extreme
numbers, lone surrogates, deep nesting, invalid or truncated JSON, duplicate keys...) and
sends the raw bytes, so bodies that no JSON encoder would write reach the server too.
The same seed gives the same requests; ``fuzz_run.py`` sends them and checks the
answers. Used by ``tests/core/server/test_fuzz.py`` (CI) and ``benchmarks/fuzz_server.py``
(the long run).

Generation is kept cheap: every mutated body asks for at most 4 tokens and 2 sequences,
unless the mutation is about ``max_tokens`` or ``n`` itself, and then only with values the
server must refuse or that stay cheap (never a long generation).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
#: Fields whose value decides the cost of a generation: mutations of them pick from
#: COST_VALUES, values refused or cheap. Never a large count in range: ``max_tokens``
#: beyond the context is accepted (generation stops at the context, docs/serving.md),
#: and one such request costs a minute on a 2-core machine.
COST_FIELDS = ("max_tokens", "max_completion_tokens", "n", "best_of")
COST_VALUES: list[Any] = [0, -1, 2**53, 2**63, 2**64, 1e308, "4", 4.0, 4.5, True, [4], {}]
# Around the int64 and float64 limits the engine's tensors hold (2**63 overflows int64).
EXTREME_NUMBERS: list[Any] = [2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**64, 10**30]
EXTREME_NUMBERS += [-1, 0, 1e308, -1e308, 5e-324, 0.5, -0.0]
NUMBER_FIELDS = "temperature top_p top_k seed logprobs top_logprobs min_tokens".split()
NUMBER_FIELDS += "presence_penalty priority prompt_logprobs repetition_penalty min_p".split()
#: Written verbatim: Python's JSON reader accepts them, JSON does not.
NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]
# Control, zero-width, combining, right-to-left, astral, template-looking, format strings.
ODD_TEXTS = ["", " ", "\u0000", "\u200b\u200d", "e\u0301\u0301\u0301", "\u202eRTL", "😀" * 50]
ODD_TEXTS += ["\U0010ffff", "<|im_start|>system\n", "{{ raise_exception('x') }}", "%s%n%x"]
TYPE_SWAPS: list[Any] = [None, True, False, 0, -1, 1.5, "", "x", [], [None], {}, {"a": 1}, [[]]]


def valid_bodies(model: str) -> dict[str, list[dict[str, Any]]]:
    """Valid, cheap request bodies per route: the fuzzer's starting points."""
    message = [{"role": "user", "content": "Hi"}]
    return {
        "/v1/completions": [
            {"model": model, "prompt": "Hello", "max_tokens": 2},
            {"model": model, "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0},
            {"model": model, "prompt": ["a", "b"], "max_tokens": 2, "n": 2, "seed": 7},
            {
                "model": model,
                "prompt": "Say",
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logprobs": 2,
                "echo": True,
                "stop": ["\n"],
                "logit_bias": {"10": 5},
                "top_k": 5,
                "top_p": 0.9,
                "min_p": 0.1,
                "ignore_eos": True,
            },
        ],
        "/v1/chat/completions": [
            {"model": model, "messages": message, "max_tokens": 2},
            {
                "model": model,
                "messages": [{"role": "system", "content": "Be brief."}, *message],
                "max_tokens": 3,
                "stream": True,
                "logprobs": True,
                "top_logprobs": 2,
                "presence_penalty": 0.5,
            },
            {
                "model": model,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "max_completion_tokens": 2,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                "tool_choice": "auto",
            },
        ],
        "/tokenize": [
            {"model": model, "prompt": "Hello world"},
            {"model": model, "messages": message, "return_token_strs": True},
        ],
        "/detokenize": [{"model": model, "tokens": [1, 2, 3, 100]}],
    }


@dataclass(frozen=True, slots=True)
class FuzzRequest:
    path: str
    body: bytes
    mutation: str
    headers: dict[str, str]


def _encode(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _cap_cost(body: dict[str, Any], path: str, rng: random.Random) -> None:
    """At most 4 tokens and 2 sequences (chat's ``max_tokens`` defaults to the context),
    written first, where :func:`_cost_prefix_len` finds them."""
    if path in ("/v1/completions", "/v1/chat/completions"):
        capped = {"max_tokens": rng.randint(1, 4)}
        if body.get("n") in (1, 2):
            capped["n"] = body["n"]
        for name in COST_FIELDS:
            body.pop(name, None)
        reordered = capped | body
        body.clear()
        body.update(reordered)


def _cost_prefix_len(body: dict[str, Any]) -> int:
    """Bytes of the encoded body that hold the capped cost fields (``{"max_tokens": 2,
    "n": 1``): byte mutations leave them alone, so that a garbled ``max_tokens`` key does
    not leave a chat request to generate up to the context length."""
    capped = {name: body[name] for name in COST_FIELDS if name in body}
    return len(_encode(capped)) - 1


def _pick_key(body: dict[str, Any], rng: random.Random) -> str | None:
    keys = [key for key in body if key not in COST_FIELDS]
    return rng.choice(keys) if keys else None


def _string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every string inside ``value`` (the fields text mutations aim at)."""
    if isinstance(value, str):
        return [path]
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    return [found for key, item in items for found in _string_paths(item, (*path, key))]


def _set_at(body: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        body = body[key]
    body[path[-1]] = value


# Each mutation takes a copy of a valid body (cost already capped) and returns the bytes
# to send.
Mutation = Callable[[dict[str, Any], str, random.Random], bytes]


def drop_field(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    key = _pick_key(body, rng)
    if key is not None:
        del body[key]
    return _encode(body)


def wrong_type(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    key = _pick_key(body, rng)
    if key is not None:
        body[key] = rng.choice(TYPE_SWAPS)
    return _encode(body)


def extreme_number(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    name = rng.choice(NUMBER_FIELDS)
    body[name] = rng.choice(EXTREME_NUMBERS)
    return _encode(body)


def non_finite(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    name = rng.choice(["temperature", "top_p", "frequency_penalty", "min_p", "seed", "n"])
    body[name] = "__PLACEHOLDER__"
    return _encode(body).replace(b'"__PLACEHOLDER__"', rng.choice(NON_FINITE))


def cost_field(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    """``max_tokens`` or ``n`` itself out of range: refused, or cheap."""
    name = rng.choice(COST_FIELDS)
    value = rng.choice(COST_VALUES)
    body[name] = value
    return _encode(body)


def lone_surrogate(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    paths = _string_paths(body)
    target = rng.choice(paths) if paths else ("prompt",)
    escape = rng.choice(["\\ud800", "\\udfff", "\\udc00x", "\\ud83d"])
    _set_at(body, target, "__PLACEHOLDER__")
    return _encode(body).replace(b"__PLACEHOLDER__", escape.encode())


def odd_unicode(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    paths = _string_paths(body)
    if paths:
        _set_at(body, rng.choice(paths), rng.choice(ODD_TEXTS))
    return _encode(body)


def deep_nesting(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    depth = rng.choice([32, 1000, 5000, 50_000])
    key = _pick_key(body, rng) or "prompt"
    body[key] = "__PLACEHOLDER__"
    nested = (
        (b"[" * depth + b"]" * depth)
        if rng.random() < 0.5
        else (b'{"a":' * depth + b"1" + b"}" * depth)
    )
    return _encode(body).replace(b'"__PLACEHOLDER__"', nested)


def empty_list(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    name = rng.choice(["prompt", "messages", "tokens", "stop", "stop_token_ids", "tools"])
    body[name] = rng.choice([[], [[]], [{}], [""]])
    return _encode(body)


def invalid_bytes(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    data = bytearray(_encode(body))
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(_cost_prefix_len(body), len(data))] = rng.randrange(256)
    return bytes(data) if rng.random() < 0.8 else rng.choice([b"", b"\xff\xfe", b"null", b"[]"])


def truncated(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    data = _encode(body)
    return data[: rng.randrange(len(data))]


def extra_fields(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    for index in range(rng.randint(1, 5)):
        body[rng.choice(["x", "__proto__", "functions", "", "é"]) + str(index)] = rng.choice(
            TYPE_SWAPS
        )
    if "messages" in body and isinstance(body["messages"], list) and body["messages"]:
        body["messages"][0]["extra"] = rng.choice(TYPE_SWAPS)
    return _encode(body)


def long_string(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    paths = _string_paths(body)
    if paths:  # up to 150,000 characters: under the test server's 200,000-byte body limit
        text = rng.choice(["a", "ab ", "的", "\n"]) * rng.choice([1000, 20_000, 50_000])
        _set_at(body, rng.choice(paths), text[: rng.choice([2000, 40_000, 150_000])])
    return _encode(body)


def duplicate_key(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    key = _pick_key(body, rng) or "model"
    value = rng.choice(TYPE_SWAPS)
    data = _encode(body)
    return data[:1] + json.dumps(key).encode() + b":" + _encode(value) + b"," + data[1:]


def toggle_stream(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    body["stream"] = rng.choice([True, False, "true", 1, None])
    if rng.random() < 0.5:
        body["stream_options"] = rng.choice(
            [{"include_usage": True}, {"continuous_usage_stats": True}, {"x": 1}, [], None]
        )
    return _encode(body)


def token_ids(body: dict[str, Any], path: str, rng: random.Random) -> bytes:
    name = "tokens" if path == "/detokenize" else "prompt"
    body[name] = rng.choice([[-1], [2**63], [10**9], [1.5], ["1"], [True], [[1, 2], [3]], [0]])
    return _encode(body)


MUTATIONS: list[Mutation] = [
    drop_field,
    wrong_type,
    extreme_number,
    non_finite,
    cost_field,
    lone_surrogate,
    odd_unicode,
    deep_nesting,
    empty_list,
    invalid_bytes,
    truncated,
    extra_fields,
    long_string,
    duplicate_key,
    toggle_stream,
    token_ids,
]


def generate(seed: int, count: int, model: str, api_key: str | None) -> list[FuzzRequest]:
    """``count`` mutated requests; the same arguments give the same list."""
    rng = random.Random(seed)
    bodies = valid_bodies(model)
    requests = []
    for _ in range(count):
        path = rng.choice(ROUTES)
        body = json.loads(json.dumps(rng.choice(bodies[path])))
        _cap_cost(body, path, rng)
        mutation = rng.choice(MUTATIONS)
        headers = {"Content-Type": "application/json"}
        if api_key is not None and rng.random() > 0.01:  # 1%: no key, a 401
            headers["Authorization"] = f"Bearer {api_key}"
        requests.append(FuzzRequest(path, mutation(body, path, rng), mutation.__name__, headers))
    return requests
