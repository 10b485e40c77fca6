import pytest

from haifctl.errors import InvalidInput
from haifctl.schema import decode_request, validate_request


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b'{"prompt": "x", "max_tokens": "5"}',
            "payload: max_tokens: expected `int | null`, got `str`",
        ),
        (b'{"prompt": "x", "temperature": 9}', "payload: temperature: expected `float` <= 5.0"),
        (b'{"prompt": "x", "colour": 1}', "unknown field `colour`"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages[0]: role must be one of"),
        (
            b'{"messages": [{"role": "user"}]}',
            "messages[0]: object missing required field `content`",
        ),
        (b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "exactly one of"),
        (b"{}", "exactly one of"),
        (b'{"messages": []}', "at least one message"),
        (b"[1, 2]", "expected `object`, got `array`"),
        (b'{"prompt": ', "payload is not valid JSON"),
        (b"\xff\xfe", "payload is not valid JSON"),
    ],
)
def test_bad_payloads_name_the_field(payload: bytes, expected: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_request(payload)
    assert expected.lower() in info.value.message.lower()
    assert "\n" not in info.value.message


def test_sampling_merges_request_over_model_defaults_over_settings() -> None:
    request = decode_request(b'{"prompt": "x", "temperature": 0.2, "stop": "END"}')
    params = request.sampling({"temperature": 0.9, "top_k": 7, "max_tokens": 12}, max_tokens=64)
    assert params.temperature == 0.2  # the request wins
    assert params.top_k == 7  # the model's registered default fills the gap
    assert params.max_tokens == 12  # over haifctl's own default
    assert params.stop == ("END",)
    assert validate_request({"prompt": "x"}).sampling({}, max_tokens=64).max_tokens == 64


def test_system_turns_a_prompt_into_messages() -> None:
    request = validate_request({"prompt": "hello", "system": "be brief"})
    messages = request.chat_messages()
    assert messages is not None
    assert [(m.role, m.content) for m in messages] == [("system", "be brief"), ("user", "hello")]
    assert validate_request({"prompt": "plain"}).chat_messages() is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"prompt": "\ud800"}, "`prompt`: text holds a lone surrogate (U+D800) at index 0"),
        ({"prompt": "x", "model": "a\udcff"}, "`model`: text holds a lone surrogate (U+DCFF)"),
        ({"prompt": "x", "system": "\ud800"}, "`system`: text holds a lone surrogate"),
        ({"prompt": "x", "stop": "\ud800"}, "`stop`: text holds a lone surrogate"),
        ({"prompt": "x", "stop": ["ok", "\udfff"]}, "`stop[1]`: text holds a lone surrogate"),
        (
            {"messages": [{"role": "user", "content": "\ud800"}]},
            "`messages[0].content`: text holds a lone surrogate",
        ),
        ({"prompt": "x", "top_k": 2**64}, "top_k: expected `int` <= 2147483647"),
        ({"prompt": "x", "max_tokens": 2**64}, "max_tokens: expected `int` <= 1048576"),
    ],
)
def test_text_no_daemon_could_send_and_integers_past_the_wire_are_invalid(
    fields: dict[str, object], expected: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_request(fields)
    assert expected in info.value.message


def test_an_integer_past_the_wire_in_json_is_invalid() -> None:
    with pytest.raises(InvalidInput) as info:
        decode_request(b'{"prompt": "x", "top_k": 18446744073709551616}')
    assert "top_k" in info.value.message
