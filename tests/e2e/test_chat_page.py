"""The web chat page in a real headless Chromium, against a live cluster."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, workers=1, bridge_env={})
    yield c
    c.stop()


def test_chat_page_streams_an_answer(cluster: Cluster, tmp_path: Path) -> None:
    if CHROMIUM is None:
        message = "Chromium is not installed (.ci/run installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
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
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(cluster.bridge)
            expect(page.locator("#model option")).to_have_count(1)
            assert page.locator("#model").input_value() == "stories260K:1"
            page.fill("#max-tokens", "40")
            page.fill("#input", "Tell me a story about a dog")
            page.keyboard.press("Enter")
            answer = page.locator(".assistant").first
            expect(answer).to_have_attribute("data-state", "done", timeout=30_000)
            assert len(answer.inner_text().split()) > 3
            stats = page.locator(".stats").first.inner_text()
            assert "40 tokens" in stats
            assert "tok/s" in stats
            page.screenshot(path=str(tmp_path / "chat.png"))
            assert errors == []
        finally:
            browser.close()
