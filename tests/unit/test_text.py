import pytest

from haifctl.chat import Message, build_prompt, fallback_prompt
from haifctl.errors import InvalidInput
from haifctl.runtime.base import StopScanner
from tests.gguf_fixtures import CHATML


def run(scanner: StopScanner, pieces: list[str]) -> str:
    out = []
    for piece in pieces:
        out.append(scanner.feed(piece))
        if scanner.stopped:
            return "".join(out)
    return "".join(out) + scanner.flush()


def test_stop_string_split_across_pieces_is_never_shown() -> None:
    scanner = StopScanner(("THE END",))
    shown = []
    for piece in ["and they lived", " happily. TH", "E E", "ND and more"]:
        shown.append(scanner.feed(piece))
        assert "TH" not in "".join(shown)  # a possible stop prefix is held back
    assert scanner.stopped
    assert "".join(shown) == "and they lived happily. "


def test_held_text_is_released_when_it_is_not_a_stop() -> None:
    scanner = StopScanner(("STOP",))
    assert scanner.feed("a ST") == "a "
    assert scanner.feed("ORY") == "STORY"
    assert not scanner.stopped
    assert run(StopScanner(("STOP",)), ["x S", "T"]) == "x ST"


def test_earliest_of_several_stops_wins() -> None:
    assert run(StopScanner(("\n\n", "END")), ["one END two\n\nthree"]) == "one "
    assert run(StopScanner(()), ["no", " stops"]) == "no stops"


def test_fallback_transcript() -> None:
    messages = [
        Message("system", "Be kind."),
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "A story?"),
    ]
    assert fallback_prompt(messages) == (
        "Be kind.\n\nUser: Hi\nAssistant: Hello\nUser: A story?\nAssistant:"
    )


def test_model_template_is_rendered_with_generation_prompt() -> None:
    prompt = build_prompt([Message("user", "Hi")], CHATML, bos_token="<s>", eos_token="</s>")
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_templates_run_sandboxed_and_report_their_errors() -> None:
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidInput, match="chat template"):
        build_prompt([Message("user", "x")], hostile)
    refusing = "{{ raise_exception('only user turns') }}"
    with pytest.raises(InvalidInput, match="only user turns"):
        build_prompt([Message("user", "x")], refusing)
    with pytest.raises(InvalidInput, match="at least one message"):
        build_prompt([], CHATML)
