"""The web chat page in a real headless Chromium, against a live cluster: model picking, streaming,
Stop, one request at a time, safe markdown, history in the browser's storage, and the worker's
own timings."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from haifctl.registry.service import builtin_model_path
from tests.cluster import HAIFCTL, Cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE = resources.files("haifctl") / "web" / "index.html"

# A model reply or a message that tries to run code or add markup: all of it must show as text.
HOSTILE = (
    '<img src=x onerror="window.__pwned=1; alert(1)">\n'
    "<script>window.__pwned=2; alert(2)</script>\n"
    "[click me](javascript:window.__pwned=3)\n"
    '**<b>bold?</b>** `<i>code</i>` <a href="https://example.com">link</a>'
)

MARKDOWN = (
    "Here is **bold**, *italic*, _also italic_ and `inline code`.\n"
    "\n"
    "- one\n"
    "- two with **strong**\n"
    "  - nested\n"
    "\n"
    "1. first\n"
    "2. second\n"
    "\n"
    "```python\n"
    "print('<hi>')\n"
    "\n"
    "x = 2 * 3 * 4\n"
    "```\n"
    "\n"
    "See [the docs](https://example.com/docs) and [not this](javascript:alert(1))."
)


def test_the_page_only_runs_its_own_script() -> None:
    """The Content-Security-Policy names the hash of the page's one script: edit the script and
    the hash must follow, or the browser runs nothing."""
    html = PAGE.read_text(encoding="utf-8")
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert policy is not None
    assert f"script-src 'sha256-{digest}'" in policy.group(1), (
        f"set the page's CSP script hash to sha256-{digest}"
    )
    assert "unsafe-inline" not in policy.group(1).split("script-src")[1].split(";")[0]
    # nothing from elsewhere: the page works with no internet
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One worker serving stories260K:1, and a second registered model, idle:1, that no worker
    serves (it sorts first, as a trap for a page that picks the first model)."""
    workdir = tmp_path_factory.mktemp("chat")
    c = Cluster(workdir, workers=1, bridge_env={})
    try:
        shutil.copy(builtin_model_path(), workdir / "idle.gguf")
        subprocess.run(
            [HAIFCTL, "models", "register", str(workdir / "idle.gguf"), "--name", "idle"],
            env=c.env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        message = "Chromium is not installed (.ci/run installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            b.close()


class Page:
    """A fresh browser profile (empty storage) on the chat page, recording what goes wrong: page
    errors, dialogs, and every request it makes."""

    def __init__(self, browser: Any, base: str) -> None:
        self.base = base
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.page.goto(base)

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(msg.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def infer_requests(self) -> int:
        return sum(
            1 for method, url in self.requests if method == "POST" and url.endswith("/infer")
        )

    def send(self, text: str) -> Any:
        """Type a message, press Enter, and wait for its answer to finish; the answer's element."""
        from playwright.sync_api import expect

        answers = self.page.locator(".assistant")
        before = answers.count()
        expect(self.page.locator("#send")).to_be_enabled()  # a served model is picked
        self.page.fill("#input", text)
        self.page.keyboard.press("Enter")
        answer = answers.nth(before)
        expect(answer).to_have_attribute("data-state", "done", timeout=30_000)
        return answer

    def set_history(self, turns: list[dict[str, str]]) -> None:
        self.page.evaluate(
            "turns => localStorage.setItem('haifctl-chat-history', JSON.stringify({turns}))", turns
        )
        self.page.reload()

    def check_clean(self) -> None:
        assert self.errors == []
        assert self.dialogs == []
        assert self.page.evaluate("window.__pwned") is None
        # nothing from elsewhere: the page works offline
        assert all(url.startswith(self.base) for _, url in self.requests), self.requests

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any, cluster: Cluster) -> Iterator[Page]:
    p = Page(browser, cluster.bridge)
    yield p
    p.close()


def words(text: str) -> list[str]:
    """The words of a text, without the characters markdown may turn into markup."""
    return re.sub(r"[*_`#>-]", " ", text).split()


def done_event(body: str) -> dict[str, Any]:
    for block in body.split("\n\n"):
        if block.startswith("event: done\n"):
            data: dict[str, Any] = json.loads(block.split("data: ", 1)[1])
            return data
    raise AssertionError(f"no done event in {body[-500:]!r}")


def test_picks_a_served_model_and_reports_the_worker_timings(page: Page) -> None:
    from playwright.sync_api import expect

    p = page.page
    options = p.locator("#model option")
    expect(options).to_have_count(2)
    # idle:1 is listed (first) and no worker serves it, but the worker loads models on demand
    # and has the memory: selectable, said to load on first use, and not picked over the model
    # that is loaded
    idle = p.locator('#model option[value="idle:1"]')
    assert idle.inner_text() == "idle:1 (loads on first use)"
    assert not idle.is_disabled()
    assert p.locator("#model").input_value() == "stories260K:1"
    expect(p.locator("#notice")).to_have_text("")

    p.click("#settings summary")
    p.fill("#max-tokens", "40")
    with p.expect_response(lambda r: r.url.endswith("/infer")) as response:
        answer = page.send("Tell me a story about a dog")
    done = done_event(response.value.text())
    assert len(answer.inner_text().split()) > 3
    assert answer.locator("p").count() >= 1  # rendered as markdown, not as raw text
    assert words(answer.inner_text()) == words(done["output"])

    # tokens/s from the worker's usage and timings, over the decode phase
    tokens = done["usage"]["completion_tokens"]
    timings = done["timings"]
    assert tokens == 40
    decode_s = (timings["generation_ms"] - timings["time_to_first_token_ms"]) / 1000
    rate = (tokens - 1) / decode_s
    stats = p.locator(".stats").first
    shown = float(stats.get_attribute("data-tokens-per-second") or "nan")
    assert math.isclose(shown, rate, rel_tol=1e-9)
    assert 0 < shown < 100_000
    text = stats.inner_text()
    assert text.startswith(f"40 tokens · {math.floor(rate + 0.5)} tok/s · first token ")
    assert f"{timings['time_to_first_token_ms']:.1f} ms" in text
    page.check_clean()


def test_stop_cancels_the_stream_and_enter_waits_for_it(page: Page, cluster: Cluster) -> None:
    """A long answer: Enter meanwhile sends nothing (the text waits in the box), Stop ends it on
    the worker too, and the waiting message then goes as usual."""
    from playwright.sync_api import expect

    p = page.page
    # note whether an answer was streaming when each Enter went down
    p.evaluate(
        """() => { window.__enters = [];
        document.addEventListener('keydown', (e) => { if (e.key === 'Enter') window.__enters.push(
          !!document.querySelector('.assistant[data-state="streaming"]')); }, true); }"""
    )
    cancelled_before = sum(
        e.get("msg") == "cancelled" for e in cluster.procs["worker-1"].log_events()
    )
    p.click("#settings summary")
    p.fill("#max-tokens", "2000")
    p.fill("#input", "Tell me a very long story")
    expect(p.locator("#send")).to_be_enabled()  # a served model is picked
    p.keyboard.press("Enter")
    answer = p.locator(".assistant").first
    p.wait_for_selector(".assistant p")  # the first tokens are in
    p.fill("#input", "And then?")
    p.keyboard.press("Enter")
    p.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    assert p.evaluate("window.__enters") == [False, True], "the second Enter came too late"
    assert page.infer_requests() == 1
    assert p.locator("#input").input_value() == "And then?"
    assert p.locator(".stats").first.inner_text() == "stopped"
    expect(p.locator("#stop")).to_be_disabled()

    # the worker cancelled the generation (the bridge saw the disconnect), and is free again
    end = time.monotonic() + 15
    while (
        sum(e.get("msg") == "cancelled" for e in cluster.procs["worker-1"].log_events())
        == cancelled_before
    ):
        assert time.monotonic() < end, "the worker never cancelled the stopped answer"
        time.sleep(0.02)  # polling interval of the probe
    with cluster.client() as client:
        while any(w.busy for w in client.stats().workers):
            assert time.monotonic() < end
            time.sleep(0.02)

    # the stopped text stays in the conversation; the next message works
    p.fill("#max-tokens", "20")
    p.focus("#input")
    p.keyboard.press("Enter")
    second = p.locator(".assistant").nth(1)
    expect(second).to_have_attribute("data-state", "done", timeout=30_000)
    assert page.infer_requests() == 2
    assert p.locator(".user").all_inner_texts() == ["Tell me a very long story", "And then?"]
    assert p.locator(".stats").nth(1).inner_text().startswith("20 tokens")
    page.check_clean()


def test_markdown_is_rendered_and_markup_is_only_text(page: Page) -> None:
    p = page.page
    page.set_history(
        [
            {"role": "user", "content": "Show me markdown"},
            {"role": "assistant", "content": MARKDOWN},
            {"role": "user", "content": HOSTILE},
            {"role": "assistant", "content": HOSTILE},
        ]
    )
    first, hostile = p.locator(".assistant").nth(0), p.locator(".assistant").nth(1)

    assert first.locator("strong").all_inner_texts() == ["bold", "strong"]
    assert first.locator("em").all_inner_texts() == ["italic", "also italic"]
    assert first.locator("p code").all_inner_texts() == ["inline code"]
    assert first.locator(":scope > ul > li").count() == 2
    assert first.locator("ul ul > li").all_inner_texts() == ["nested"]
    assert first.locator("ol > li").all_inner_texts() == ["first", "second"]
    code = first.locator("pre code")
    assert code.inner_text() == "print('<hi>')\n\nx = 2 * 3 * 4"
    assert code.get_attribute("data-lang") == "python"
    links = first.locator("a")
    assert links.count() == 1
    assert links.get_attribute("href") == "https://example.com/docs"
    assert "noopener" in (links.get_attribute("rel") or "")
    assert "[not this](javascript:alert(1))" in first.inner_text()

    # a hostile reply and a hostile message: shown character for character, nothing runs
    for element in (hostile, p.locator(".user").nth(1)):
        assert element.locator("img, script, b, i, a").count() == 0
        text = element.inner_text()
        assert '<img src=x onerror="window.__pwned=1; alert(1)">' in text
        assert "<script>window.__pwned=2; alert(2)</script>" in text
        assert "javascript:window.__pwned=3" in text
    assert hostile.locator("strong").inner_text() == "<b>bold?</b>"
    assert hostile.locator("code").inner_text() == "<i>code</i>"

    # the same text typed in and sent: it reaches the model as text, and still nothing runs
    p.click("#settings summary")
    p.fill("#max-tokens", "10")
    page.send(HOSTILE)
    assert p.locator(".user").nth(2).inner_text() == HOSTILE
    assert p.locator(".msg img, .msg script").count() == 0
    page.check_clean()


def test_pathological_replies_neither_crash_nor_hang_the_page(page: Page) -> None:
    """Deep nesting is cut (5,000 nested quotes crashed the tab), and unclosed emphasis openers
    cost one scan of each kind, not one scan each (quadratic: a second for 20 KB)."""
    from playwright.sync_api import expect

    p = page.page
    shapes = [
        ">" * 5000 + " deep",
        "".join("  " * i + "- item\n" for i in range(200)),
        "*a _b [d **e __f " * 2000,
        "# " + " " * 20000 + "title",
    ]
    page.set_history([{"role": "assistant", "content": text} for text in shapes])
    answers = p.locator(".assistant")
    expect(answers).to_have_count(len(shapes))
    assert p.locator("blockquote " * 14).count() == 0
    assert p.locator("blockquote " * 13).count() == 1
    assert "deep" in answers.nth(0).inner_text()
    assert p.locator("li " * 14).count() == 0
    assert answers.nth(2).locator("em, strong, a").count() == 0
    assert answers.nth(3).locator("h1").inner_text() == "title"
    page.check_clean()


def test_settings_are_sent_and_history_survives_a_reload_until_cleared(page: Page) -> None:
    from playwright.sync_api import expect

    p = page.page
    p.click("#settings summary")
    p.fill("#system", "You tell short stories.")
    p.fill("#temperature", "0.3")
    p.fill("#max-tokens", "25")
    with p.expect_request(lambda r: r.url.endswith("/infer")) as request:
        page.send("A story about a cat")
    sent = request.value.post_data_json
    assert sent["model"] == "stories260K:1"
    assert sent["messages"] == [
        {"role": "system", "content": "You tell short stories."},
        {"role": "user", "content": "A story about a cat"},
    ]
    assert sent["params"] == {"max_tokens": 25, "temperature": 0.3}
    assert sent["stream"] is True

    with p.expect_request(lambda r: r.url.endswith("/infer")) as request:
        page.send("And a dog?")
    # the conversation so far goes with the next message
    roles = [m["role"] for m in request.value.post_data_json["messages"]]
    assert roles == ["system", "user", "assistant", "user"]

    before = p.locator(".msg").all_inner_texts()
    stats = p.locator(".stats").all_inner_texts()
    assert len(before) == 4
    assert len(stats) == 2
    p.reload()
    expect(p.locator(".msg")).to_have_count(4)
    assert p.locator(".msg").all_inner_texts() == before
    assert p.locator(".stats").all_inner_texts() == stats
    assert p.locator("#system").input_value() == "You tell short stories."
    assert p.locator("#temperature").input_value() == "0.3"
    assert p.locator("#max-tokens").input_value() == "25"

    p.click("#clear")
    expect(p.locator(".msg")).to_have_count(0)
    p.reload()
    expect(p.locator("#model option")).to_have_count(2)
    assert p.locator(".msg").count() == 0
    history = p.evaluate("JSON.parse(localStorage.getItem('haifctl-chat-history'))")
    assert history == {"turns": []}
    # a fresh conversation sends only the new message
    with p.expect_request(lambda r: r.url.endswith("/infer")) as request:
        page.send("Hello")
    assert [m["role"] for m in request.value.post_data_json["messages"]] == ["system", "user"]
    page.check_clean()


def test_asks_for_a_key_and_waits_for_a_worker(browser: Any, tmp_path: Path) -> None:
    """A bridge with API keys and no worker yet: the page asks for the key, then says that no
    worker serves a model and keeps Send off until one does."""
    from playwright.sync_api import expect

    c = Cluster(tmp_path, workers=0, bridge_env={"HAIF_API_KEYS": "sk-chat-page-test"})
    page = Page(browser, c.bridge)
    try:
        p = page.page
        notice = p.locator("#notice")
        expect(notice).to_contain_text("This bridge needs an API key")
        assert p.locator("#settings").get_attribute("open") is not None
        p.fill("#api-key", "sk-wrong")
        p.locator("#api-key").press("Tab")
        expect(notice).to_have_text("The bridge refused this API key: check it under settings.")
        p.fill("#api-key", "sk-chat-page-test")
        p.locator("#api-key").press("Tab")
        expect(notice).to_contain_text("No worker serves a model yet")
        expect(p.locator("#model option")).to_have_text(["stories260K:1 (no worker)"])
        expect(p.locator("#send")).to_be_disabled()
        p.fill("#input", "Hello")
        p.keyboard.press("Enter")
        assert page.infer_requests() == 0

        c.start_worker("worker-1")
        c.wait_workers(1)
        # the page looks again every 5 s while nothing is served
        expect(p.locator("#model")).to_have_value("stories260K:1", timeout=20_000)
        expect(notice).to_be_empty()
        p.fill("#max-tokens", "10")
        answer = page.send("Hello")
        assert answer.inner_text().strip()
        # the 401s above are the console errors a refused request leaves; nothing else went wrong
        page.errors = [e for e in page.errors if "401" not in e]
        page.check_clean()
    finally:
        page.close()
        c.stop()
