"""The OpenAI API beyond plain text, driven by the official SDK against a live cluster:
structured output (validated with ``jsonschema``), tools, penalties, logit_bias, logprobs, n,
prompt lists and token ids, echo, the small routes, and fields the server refuses by name."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from haifctl.registry.service import builtin_model_path
from tests.cluster import Cluster

KEY = "haif-test-key-openai-api"
MODEL = "stories260K"
USER = [{"role": "user", "content": "Tell me about a pet."}]

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "kind", "tags"],
    "additionalProperties": False,
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat enum and required": PET,
    "nested objects": {
        "type": "object",
        "properties": {
            "owner": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "home": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 10}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "home"],
                "additionalProperties": False,
            },
            "pet": {"$ref": "#/$defs/pet"},
        },
        "required": ["owner", "pet"],
        "additionalProperties": False,
        "$defs": {"pet": PET},
    },
    "array of objects, numbers, booleans and null": {
        "type": "array",
        "minItems": 1,
        "maxItems": 3,
        "items": {
            "type": "object",
            "properties": {
                "score": {"type": "number"},
                "ok": {"type": "boolean"},
                "note": {"type": ["string", "null"], "maxLength": 6},
                "level": {"anyOf": [{"const": "low"}, {"const": "high"}]},
            },
            "required": ["score", "ok", "note", "level"],
            "additionalProperties": False,
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("openai"), workers=1, slots=4, bridge_env={"HAIF_API_KEYS": KEY}
    )
    try:
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.bridge}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def vocab() -> Any:
    """The shipped model's tokeniser, loaded in the test (vocabulary only) to name token ids."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(builtin_model_path()), vocab_only=True, verbose=False)


# structured output --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates_every_time(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for seed in (1, 2, 3):
        done = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=400, seed=seed, response_format=fmt
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
    streamed = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=400, seed=7, response_format=fmt, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_output_is_an_object(client: openai.OpenAI, vocab: Any) -> None:
    # This model writes stories, not JSON: left alone it fills keys and values with prose and
    # never closes the object.  A bias towards the quote and the closing brace lets it finish;
    # the grammar decides where either may appear.
    quote = vocab.tokenize(b'"', add_bos=False)[-1]
    brace = vocab.tokenize(b"}", add_bos=False)[-1]
    for seed in (1, 2, 3):
        done = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=300,
            seed=seed,
            response_format={"type": "json_object"},
            logit_bias={str(quote): 10, str(brace): 15},
        )
        assert done.choices[0].finish_reason == "stop", done.choices[0]
        assert isinstance(json.loads(done.choices[0].message.content or ""), dict)


def test_a_schema_keyword_that_cannot_be_enforced_is_refused_by_name(
    client: openai.OpenAI,
) -> None:
    for schema, keyword in (
        ({"type": "integer", "minimum": 3}, "minimum"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "format": "email"}, "email"),
        ({"$ref": "https://example.com/s.json"}, "references"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL,
                messages=USER,
                max_tokens=8,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                },
            )
        error = info.value.body
        assert isinstance(error, dict)
        assert error["code"] == "unsupported_schema"
        assert error["param"] == "response_format"
        assert keyword in error["message"]


def test_a_gbnf_grammar_and_a_json_schema_field_as_llama_server_has_them(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    for seed in range(4):
        done = client.completions.create(
            model=MODEL,
            prompt="Is it raining?",
            max_tokens=8,
            seed=seed,
            extra_body={"grammar": 'root ::= "yes" | "no"'},
        )
        assert done.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=4, extra_body={"grammar": "root ::= ("}
        )
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "invalid_grammar"
    # /infer takes json_schema in its params, as `haifctl infer --json` takes it in the payload
    body = {"prompt": "A pet:", "params": {"max_tokens": 300, "seed": 5, "json_schema": PET}}
    answer = httpx.post(
        f"{cluster.bridge}/infer",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    jsonschema.validate(json.loads(answer.json()["output"]), PET)


# tools --------------------------------------------------------------------------------------


def test_a_required_tool_call_is_valid_for_its_function_and_round_trips(
    client: openai.OpenAI,
) -> None:
    tools: Any = [WEATHER, TIME]
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for seed in (1, 2):
        done = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=tools,
            tool_choice="required",
            seed=seed,
            max_tokens=200,
        )
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls
        assert calls is not None
        assert len(calls) == 1
        call = calls[0]
        assert call.type == "function"
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    # the conversation goes on with the call and its result, as an agent loop sends it
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    after = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, tool_choice="none", max_tokens=16, seed=3
    )
    assert after.choices[0].message.tool_calls is None
    assert after.choices[0].message.content
    assert after.choices[0].finish_reason in ("stop", "length")


def test_a_named_tool_call_streams_as_the_sdk_expects(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=100,
        seed=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"]
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_time"
    assert calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), TIME["function"]["parameters"])  # type: ignore[index]
    assert usage is not None
    assert usage.completion_tokens > 0


def test_tool_mistakes_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "no_such_tool"}},
        )
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[bad],
            tool_choice="required",  # type: ignore[list-item]
        )
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "tools"


# sampling fields ----------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_a_token(client: openai.OpenAI, vocab: Any) -> None:
    token = vocab.tokenize(b" dog", add_bos=False)[-1]
    piece = vocab.detokenize([token]).decode()
    done = client.completions.create(
        model=MODEL, prompt="Once", max_tokens=5, temperature=0, logit_bias={str(token): 100}
    )
    assert done.choices[0].text == piece * 5
    plain = client.completions.create(
        model=MODEL, prompt="Once upon a", max_tokens=1, temperature=0
    )
    wanted = plain.choices[0].text.encode()
    first = next(t for t in range(vocab.n_vocab()) if vocab.detokenize([t]) == wanted)
    banned = client.completions.create(
        model=MODEL,
        prompt="Once upon a",
        max_tokens=1,
        temperature=0,
        logit_bias={str(first): -100},
    )
    assert banned.choices[0].text != plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", logit_bias={"99999999": 1})
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "invalid_token"


def test_presence_and_frequency_penalties_as_openai_defines_them(client: openai.OpenAI) -> None:
    def tokens(**penalty: float) -> list[str]:
        done = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=64,
            temperature=0,
            logprobs=0,
            extra_body={"repeat_penalty": 1.0, "ignore_eos": True},
            **penalty,  # type: ignore[arg-type]
        )
        logprobs = done.choices[0].logprobs
        assert logprobs is not None
        assert logprobs.tokens is not None
        return logprobs.tokens

    plain = tokens()
    for name in ("frequency_penalty", "presence_penalty"):
        repeated = tokens(**{name: -2.0})
        varied = tokens(**{name: 2.0})
        assert len(set(varied)) > len(set(plain)) > len(set(repeated)), name


def test_logprobs_match_the_text(client: openai.OpenAI) -> None:
    # logprobs are the model's own distribution; with no penalty, greedy picks its likeliest
    plain: Any = {"repeat_penalty": 1.0}
    done = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=plain,
    )
    choice = done.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert e.logprob <= 0
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the likeliest
        assert bytes(e.bytes or []) == e.token.encode()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        stream=True,
        extra_body=plain,
    )
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    text = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=2
    )
    lp = text.choices[0].logprobs
    assert lp is not None
    assert lp.tokens
    assert lp.token_logprobs
    assert lp.top_logprobs
    assert lp.text_offset
    assert "".join(lp.tokens) == text.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_n_choices_prompt_lists_token_ids_and_echo(client: openai.OpenAI, vocab: Any) -> None:
    fixed: Any = {"ignore_eos": True}
    three = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=16, n=3, seed=42, extra_body=fixed
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert len(set(texts)) == 3
    assert three.usage is not None
    assert three.usage.completion_tokens == 3 * 16  # usage counts every choice
    again = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=16, n=3, seed=42, extra_body=fixed
    )
    assert [c.message.content for c in again.choices] == texts  # a seed reproduces every choice
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, seed=3, stream=True
    )
    seen: dict[int, str] = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            seen[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    assert all(seen.values())
    # a list of prompts, and a prompt as token ids, which gives what its text gives
    ids = vocab.tokenize(b"Once upon a time", add_bos=True)
    listed = client.completions.create(
        model=MODEL, prompt=["Once upon a time", "The cat"], max_tokens=8, temperature=0
    )
    assert len(listed.choices) == 2
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == listed.choices[0].text
    echoed = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Once upon a time" + listed.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[[*ids[:2], 10**6]], max_tokens=2)
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "invalid_token"


def test_fields_not_implemented_are_refused_by_name(client: openai.OpenAI) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("store", {"store": True}),
        ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
        ("metadata", {"metadata": {"a": "b"}}),
    ]
    for field, extra in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL, messages=USER, max_tokens=2, extra_body=extra
            )
        assert isinstance(info.value.body, dict)
        assert info.value.body["param"] == field
        assert info.value.body["code"] == "unsupported"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, best_of=3)
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, suffix="end")
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "infill_unsupported"


# the small routes ---------------------------------------------------------------------------


def test_models_retrieve(client: openai.OpenAI) -> None:
    for model_id in ("stories260K", "stories260K:1"):
        model = client.models.retrieve(model_id)
        assert model.id == model_id
        assert model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_docs_work_offline(cluster: Cluster) -> None:
    page = httpx.get(f"{cluster.bridge}/docs", timeout=10)
    assert page.status_code == 200
    assert "cdn." not in page.text
    assert "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        served = httpx.get(f"{cluster.bridge}/docs/assets/{asset}", timeout=10)
        assert served.status_code == 200
        assert len(served.content) > 10_000
    assert httpx.get(f"{cluster.bridge}/openapi.json", timeout=10).json()["paths"]


def test_keep_alive_and_labels_pass_through_the_openai_routes(client: openai.OpenAI) -> None:
    placed: Any = {"keep_alive": "30s", "labels": {}}
    done = client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=placed)
    assert done.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:  # validated by the cluster, not dropped
        client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=2, extra_body={"keep_alive": "soon"}
        )
    assert isinstance(info.value.body, dict)
    assert "keep_alive" in info.value.body["message"]


def test_mistakes_in_several_sequences_answer_once_and_cleanly(client: openai.OpenAI) -> None:
    # each prompt's sequence fails the same way: the first failure is the answer, a 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=["a", "b", "c"], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=USER, n=4, max_tokens=2)
    # labels no worker carries: the request's to change
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_body={"labels": {"gpu": "none"}}
        )
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "no_matching_workers"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text


def test_after_keep_alive_zero_the_model_loads_again_and_embeddings_are_still_a_400(
    client: openai.OpenAI,
) -> None:
    # keep_alive 0 unloads the model after the request; the next one loads it again on demand
    gone: Any = {"keep_alive": 0}
    client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=gone)
    end = time.monotonic() + 15
    while (client.models.retrieve(MODEL).model_extra or {}).get("workers") != 0:
        assert time.monotonic() < end, "the model was not unloaded"
        time.sleep(0.05)  # polling the probe
    # an embedding request meanwhile: none of this cluster's workers makes embeddings, loaded or
    # not, so it is the request's mistake (400), not an outage
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="hello")
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "embeddings_unsupported"
    for _ in range(3):
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text
