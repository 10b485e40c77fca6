"""The bridge's renderers: a stream's text chunk made from a template is the chunk the general
path makes, byte for byte, whatever the text and the model name hold."""

from __future__ import annotations

import json

import pytest

from haifctl.daemon.bridge.render import ChatRenderer, OpenAIRenderer, TextRenderer

TEXTS = ['he said "hi"\n', "é ✓ 😀", "\x00text\x00", "", "\\u0000", "</script>"]


@pytest.mark.parametrize("renderer", [TextRenderer, ChatRenderer])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("model", ["m", 'we"ird\x00text\x00model'])
def test_a_templated_text_chunk_is_the_general_chunk(
    renderer: type[OpenAIRenderer], include_usage: bool, model: str
) -> None:
    r = renderer(model, include_usage, False)
    for index in (0, 3):
        for text in TEXTS:
            general = r.chunk(
                {"index": index, **r.text_field(text), "finish_reason": None, "logprobs": None}
            )
            assert r.text_chunk(index, text) == general
            body = json.loads(general.removeprefix(b"data: "))
            assert body["model"] == model
            assert body["choices"][0]["index"] == index
