"""The chat page at GET /, driven in headless Chromium against the real server on a tiny model.

Needs playwright (pip) and a Chromium on PATH (Debian's `chromium` package: playwright's own browser
download is not used). The server runs as a subprocess on a free port; the tiny random model speaks
gibberish, so the tests check that text streams in, not what it says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from playwright import sync_api  # noqa: E402  (a dev dependency)

from tests.server_utils import free_port

expect = sync_api.expect

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
API_KEY = "sk-test-chat-page"
STARTUP_TIMEOUT_S = 180
REPLY_TIMEOUT_MS = 120_000

# `make test` installs chromium (Makefile: chromium). CI sets JAXINFER_REQUIRE_BROWSER=1, so a missing
# browser fails there instead of skipping.
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("JAXINFER_REQUIRE_BROWSER"),
                                reason="no chromium on PATH (make chromium, or apt-get install chromium)")


def _get(url: str, api_key: str | None = None, timeout: float = 5.0):
    """(status, Content-Type, body) of a GET."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


@contextmanager
def _serve(model: Path, log_path: Path, *extra: str, api_key: str | None = None):
    """Runs `server.py` on a free port until /health answers 200; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "server.py"), "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--max-num-seqs", "4", "--max-num-batched-tokens", "64", *extra]  # few shapes
    if api_key:
        cmd += ["--api-key", api_key]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"server exited with {proc.returncode} before it was ready:\n{_tail(log_path)}")
                try:
                    if _get(url + "/health", api_key, timeout=2)[0] == 200:  # (any error: not up yet)
                        break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{_tail(log_path)}")
                time.sleep(0.5)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_bytes()[-n:].decode(errors="replace")


class PacedRelay:
    """A TCP relay to `upstream` that waits `pause` s after each server-sent event it passes on.

    The tiny model streams a whole 24-token reply in about 30 ms, and Chromium may hand bytes that
    close together to the page in one read, so "the text grew in steps" would depend on timing. Paced,
    every event reaches the page in its own read: what is tested is that the page shows text while
    the response is still arriving. Bytes are passed on unchanged.
    """

    def __init__(self, upstream: str, pause: float = 0.03):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.pause = (host, int(port)), pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool):
        """Copies src to dst until EOF; downstream (server to browser) is paced, and closes both at the end."""
        try:
            while data := src.recv(65536):
                for piece in re.split(rb"(?<=\n\n)", data) if downstream else [data]:
                    dst.sendall(piece)
                    if downstream and piece.endswith(b"\n\n") and b"data:" in piece:
                        time.sleep(self.pause)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            if downstream:
                src.close()
                dst.close()

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        except OSError:
            pass
        self.listener.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from jaxinfer.testing import tiny_gguf

    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with _serve(tiny_model, tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(tiny_model, tmp_path_factory):
    with _serve(tiny_model, tmp_path_factory.mktemp("log") / "server.log", api_key=API_KEY) as url:
        yield url


@pytest.fixture
def paced_server(server):
    relay = PacedRelay(server)
    yield relay.url
    relay.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 800})  # fresh localStorage per test
    pg = context.new_page()
    yield pg
    context.close()


# Records the last assistant message's text length each time the DOM changes, until it is done.
RECORD_LENGTHS = """() => {
  window.__lengths = [];
  const box = document.getElementById("messages");
  new MutationObserver(() => {
    const all = box.querySelectorAll(".message.assistant");
    const last = all[all.length - 1];
    if (last && last.getAttribute("data-done") !== "true") window.__lengths.push(last.textContent.length);
  }).observe(box, {childList: true, subtree: true, characterData: true});
}"""


def _ask(page, question: str) -> None:
    page.evaluate("document.getElementById('settings').open = true")
    page.fill("#temperature", "1.0")  # sampled, the tiny random model says a few tokens before any EOS
    page.fill("#max-tokens", "24")
    page.fill("#prompt", question)
    page.click("#send")


def _done_reply(page):
    reply = page.locator('.message.assistant[data-done="true"]')
    expect(reply).to_have_count(1, timeout=REPLY_TIMEOUT_MS)
    return reply


def _save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("JAXINFER_ARTIFACTS"):
        out = Path(os.environ["JAXINFER_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


def _model_id(url: str, api_key: str | None = None) -> str:
    return json.loads(_get(url + "/v1/models", api_key)[2])["data"][0]["id"]


def test_chat_page_streams_a_reply(page, server, paced_server, tmp_path):
    status, content_type, body = _get(server + "/")
    assert status == 200 and content_type.startswith("text/html") and b'id="messages"' in body
    model_id = _model_id(server)

    page.goto(paced_server + "/")
    expect(page.locator("#model")).to_have_text(model_id)
    page.evaluate(RECORD_LENGTHS)
    _ask(page, "Hello! Who are you?")

    expect(page.locator(".message.user")).to_have_text("Hello! Who are you?")
    reply = _done_reply(page)
    text = reply.text_content()
    assert text.strip(), "the assistant message is empty"
    assert page.locator(".error").count() == 0

    lengths = page.evaluate("window.__lengths")
    grown = sorted({n for n in lengths if n > 0})
    assert len(grown) >= 2, f"the reply arrived all at once, not streamed: lengths {lengths}"
    assert grown[-1] <= len(text)
    expect(page.locator("#status")).to_contain_text("tok/s")
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()

    shot = _save_screenshot(page, tmp_path, "chat_page.png")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    page.set_viewport_size({"width": 375, "height": 700})  # a phone: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    box = page.locator("#send").bounding_box()
    assert box["x"] + box["width"] <= 375
    _save_screenshot(page, tmp_path, "chat_page_phone.png")


def test_chat_page_api_key(page, keyed_server, tmp_path):
    request = urllib.request.Request(keyed_server + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    message = json.loads(refused.value.read())["error"]["message"]

    page.goto(keyed_server + "/")
    _ask(page, "Are you there?")
    error = page.locator("#messages .error")
    expect(error).to_contain_text("401", timeout=REPLY_TIMEOUT_MS)
    expect(error).to_contain_text(message)
    assert page.locator(".message.assistant").count() == 0  # the refused turn is taken back

    page.fill("#api-key", API_KEY)
    page.fill("#prompt", "Are you there?")
    page.press("#prompt", "Enter")  # Enter sends
    reply = _done_reply(page)
    assert reply.text_content().strip()
    assert page.locator(".error").count() == 0
    assert page.evaluate("localStorage.getItem('jaxinfer.apiKey')") == API_KEY
    _save_screenshot(page, tmp_path, "chat_page_api_key.png")

    page.reload()  # the key is remembered in this browser
    expect(page.locator("#api-key")).to_have_value(API_KEY)
    expect(page.locator("#model")).to_have_text(_model_id(keyed_server, API_KEY))
