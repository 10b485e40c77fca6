"""`haifctl infer` as a user runs it: a real process, the real shipped model."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import HAIFCTL, Run
from tests.gguf_fixtures import CHATML, copy_with_metadata


def test_infer_streams_a_story_with_no_setup(haifctl: Run, home: Path) -> None:
    proc = haifctl("infer", "Once upon a time", "--max-tokens", "64", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) > 20
    assert (home / "registry.db").is_file()  # the shipped model was registered on first use
    listing = json.loads(haifctl("models", "list", "--json").stdout)
    assert [m["name"] for m in listing] == ["stories260K"]


def test_text_and_json_output_agree(haifctl: Run) -> None:
    args = ("infer", "Once upon a time", "-n", "40", "--seed", "11", "--temperature", "0.7")
    text = haifctl(*args).stdout
    result = json.loads(haifctl(*args, "--output", "json").stdout)
    assert text == result["text"] + "\n"
    assert result["model"] == "stories260K:1"
    assert result["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}
    assert result["timings"]["tokens_per_second"] > 0
    assert result["timings"]["time_to_first_token_ms"] > 0
    assert result["served_by"] == "in-process"


def test_stop_and_sampling_flags(haifctl: Run) -> None:
    base = ["infer", "Once upon a time", "-n", "100", "--temperature", "0", "-o", "json"]
    full = json.loads(haifctl(*base).stdout)["text"]
    word = full.split()[5]
    stopped = json.loads(haifctl(*base, "--stop", word, "--stop", "NEVER").stdout)
    assert stopped["finish_reason"] == "stop"
    assert full.startswith(stopped["text"])
    assert word not in stopped["text"]
    for flags in (
        ["--top-k", "1"],
        ["--top-p", "0.5"],
        ["--min-p", "0.2"],
        ["--repeat-penalty", "1.3"],
    ):
        out = json.loads(haifctl("infer", "Once", "-n", "10", "-o", "json", *flags).stdout)
        assert out["usage"]["completion_tokens"] == 10


def test_json_payload_from_file_and_stdin(haifctl: Run, tmp_path: Path) -> None:
    payload = {"prompt": "The little dog", "max_tokens": 12, "seed": 3, "stop": ["\n\n"]}
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload))
    from_file = json.loads(haifctl("infer", "--json", str(path), "-o", "json").stdout)
    from_stdin = json.loads(
        haifctl("infer", "--json", "-", "-o", "json", input=json.dumps(payload)).stdout
    )
    assert from_file["text"] == from_stdin["text"]
    assert from_file["usage"]["prompt_tokens"] == 5  # BOS + 4 tokens
    # a flag overrides the payload
    short = json.loads(haifctl("infer", "--json", str(path), "-n", "3", "-o", "json").stdout)
    assert short["usage"]["completion_tokens"] == 3


def test_messages_use_the_models_chat_template(
    haifctl: Run, tmp_path: Path, model_path: Path
) -> None:
    chat_model = copy_with_metadata(
        model_path, tmp_path / "chat.gguf", {"tokenizer.chat_template": CHATML}
    )
    reg = haifctl("models", "register", str(chat_model), "--name", "chatty")
    assert reg.returncode == 0, reg.stderr
    payload = {"model": "chatty", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    out = json.loads(
        haifctl("infer", "--json", "-", "-o", "json", input=json.dumps(payload)).stdout
    )
    # <s> + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", tokenised by the model
    plain = json.loads(haifctl("infer", "Hi", "-m", "chatty", "-n", "5", "-o", "json").stdout)
    assert out["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 10
    # without a template the documented transcript fallback is used
    fallback = json.loads(
        haifctl("infer", "Hi", "--system", "Be kind.", "-n", "5", "-o", "json").stdout
    )
    assert fallback["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    ("args", "stdin", "message", "code"),
    [
        (["infer", "x", "-m", "nosuchmodel"], None, "error: unknown model 'nosuchmodel'", 2),
        (["infer", "x", "-m", "stories260K:9"], None, "has no version '9'", 2),
        (
            ["infer", "x", "-m", "/no/such/file.gguf"],
            None,
            "error: no such file: /no/such/file.gguf",
            2,
        ),
        (["infer", "--json", "-"], "{not json", "error: stdin is not valid JSON", 2),
        (
            ["infer", "--json", "-"],
            '{"prompt": "x", "top_k": "many"}',
            "error: stdin: top_k: expected",
            2,
        ),
        (["infer", "--json", "/no/payload.json"], None, "error: no such payload file", 2),
        (["infer"], None, "error: no prompt given", 2),
        (["infer", "x", "--json", "-"], "{}", "give a PROMPT or --json, not both", 2),
        (["--registry-url", "mysql://x/y", "models", "list"], None, "unsupported registry URL", 2),
        (
            ["--registry-url", "postgresql://u:pw@127.0.0.1:1/db", "models", "list"],
            None,
            "error: cannot reach the Postgres registry at postgresql://u:********@127.0.0.1:1/db",
            3,
        ),
    ],
)
def test_user_mistakes_get_one_error_line_and_a_hint(
    haifctl: Run, args: list[str], stdin: str | None, message: str, code: int
) -> None:
    proc = haifctl(*args, input=stdin)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert len(lines) <= 2
    assert len(lines) == 1 or lines[1].startswith("hint: ")
    assert "pw" not in proc.stderr


def test_non_gguf_and_truncated_models(haifctl: Run, tmp_path: Path, model_path: Path) -> None:
    text = tmp_path / "readme.gguf"
    text.write_text("not a model")
    proc = haifctl("infer", "x", "-m", str(text))
    assert proc.returncode == 2
    assert "is not a GGUF file" in proc.stderr
    assert "hint:" in proc.stderr
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:700_000])
    proc = haifctl("infer", "x", "-m", str(cut))
    assert proc.returncode == 2
    assert "truncated or corrupt" in proc.stderr


def test_errors_in_json_mode_are_json(haifctl: Run) -> None:
    proc = haifctl("infer", "x", "-m", "ghost", "-o", "json")
    assert proc.returncode == 2
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "model_not_found"
    assert "ghost" in error["message"]
    assert error["hint"]


def test_oversized_prompt_is_refused_cleanly(haifctl: Run) -> None:
    proc = haifctl("infer", "-", input="once upon a time " * 2000)
    assert proc.returncode == 2
    assert "error: the prompt is" in proc.stderr
    assert "--n-ctx" in proc.stderr


def test_ctrl_c_stops_generation_cleanly(home: Path) -> None:
    # A one-page pipe that nobody reads yet: the CLI blocks writing tokens, deterministically
    # mid-generation (2000 tokens are far more than a page), when the interrupt arrives.
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        [HAIFCTL, "infer", "Once upon a time", "-n", "2000", "--ignore-eos", "--seed", "1"],
        stdout=write_fd,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a runner started in the background by a shell without job
        # control ignores SIGINT, and an ignored signal stays ignored across exec
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        wchan = Path(f"/proc/{proc.pid}/wchan")
        deadline = time.monotonic() + 60
        # Probe the writer's kernel state (blocked in pipe_write), rather than sleeping.
        while "pipe_write" not in wchan.read_text():
            assert proc.poll() is None, "haifctl finished before the pipe filled"
            assert time.monotonic() < deadline, "haifctl never blocked on the full pipe"
        proc.send_signal(signal.SIGINT)
        output = reader.read()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "stopped" in stderr
    assert "Traceback" not in stderr
    assert 500 < len(output) < 6000  # a page or so of text: it really stopped early


def test_python_dash_m_and_version(haifctl: Run) -> None:
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "haifctl", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("haifctl ")
    assert haifctl("--help").returncode == 0
