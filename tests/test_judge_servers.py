"""Judges against misbehaving servers that echo the request (headers and body) back: every error names the problem,
and neither it, its traceback, the log nor stdout/stderr ever shows the API key (bench.redact)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.judges.base import JudgeItem
from bench.judges.openai_judge import JudgeRequestError, OpenAIJudge
from bench.redact import MASK, redact, redacted

SECRET = "sk-test-SECRET123"
HF_SECRET = "hf_testSECRET1234567890abcdefXYZ"
ROOT = Path(__file__).resolve().parents[1]
ITEM = JudgeItem("What is the capital of France?", "Paris.", ("Paris",), ("Lyon",))


def _echo(handler: BaseHTTPRequestHandler, body: bytes) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in handler.headers.items())
    return f"{handler.command} {handler.path}\n{headers}\n\n{body.decode(errors='replace')}"


#: mode -> (status, response body built from the echoed request)
RESPONSES = {
    "500": lambda echo: (500, echo),
    "401": lambda echo: (401, json.dumps({"error": {"message": f"invalid key; your request was:\n{echo}"}})),
    "garbage": lambda echo: (200, "<html>not json</html>\n" + echo),
    "missing": lambda echo: (200, json.dumps({"id": "x", "echo": echo})),
}


class EchoServer:
    """A loopback HTTP server answering every request with ``RESPONSES[mode]`` of the echoed request."""

    def __init__(self) -> None:
        self.mode = "500"
        self.seen: list[str] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, send_body: bool) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                echo = _echo(self, raw)
                state.seen.append(echo)
                status, body = RESPONSES[state.mode](echo)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Message", "echo: " + echo.replace("\n", " | "))  # HEAD has no body
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if send_body:
                    self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                self._answer(True)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(False)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture()
def server() -> Iterator[EchoServer]:
    srv = EchoServer()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as sock:  # a free port with nothing listening
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and "SECRET123" not in text, text


# (case id, server mode or None for a closed port, protocol, fragments the error must contain)
CASES = [
    ("http-500", "500", "chat", ["HTTP 500", "chat/completions failed after 1 attempt", MASK]),
    ("http-401", "401", "chat", ["answered HTTP 401", "API key was refused", "invalid key", MASK]),
    ("garbage-json", "garbage", "chat", ["malformed (non-JSON) response", "expected a JSON chat completion",
                                         "not json", MASK]),
    ("missing-fields-chat", "missing", "chat", ["unexpected response shape", "KeyError", "choices",
                                                "expected a JSON chat completion", MASK]),
    ("missing-fields-completion", "missing", "completion", ["unexpected response shape", "choices",
                                                            "expected a JSON completion", MASK]),
    ("unreachable", None, "chat", ["chat/completions failed after 1 attempt", "APIConnectionError"]),
]


@pytest.mark.parametrize(("mode", "protocol", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_openai_judge_errors_are_clear_and_redacted(server: EchoServer, tmp_path: Path, monkeypatch, caplog, capsys,
                                                    mode: str | None, protocol: str, expected: list[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    url = f"{server.url}/v1" if mode else closed_port_url()
    server.mode = mode or "500"
    judge = OpenAIJudge(model="judge", base_url=url, protocol=protocol, max_retries=0, timeout=5.0,
                        requests_per_minute=None, cache_dir=tmp_path / "cache", workers=1)
    with caplog.at_level("DEBUG"), pytest.raises(JudgeRequestError) as info:
        judge.judge([ITEM])
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, message
    if mode:  # the server did see the key (the test is not vacuous) and echoed it back
        assert any(SECRET in seen for seen in server.seen)
    out = capsys.readouterr()
    assert_no_secret(message, "".join(traceback.format_exception(info.value)), caplog.text, out.out, out.err)
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are never cached


def test_retry_log_lines_are_redacted(server: EchoServer, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setattr("bench.judges.openai_judge.time.sleep", lambda s: None)
    judge = OpenAIJudge(model="judge", base_url=f"{server.url}/v1", max_retries=2, requests_per_minute=None,
                        cache_dir=tmp_path / "cache", workers=1)
    with caplog.at_level("WARNING"), pytest.raises(JudgeRequestError, match="failed after 3 attempts: HTTP 500"):
        judge.judge([ITEM])
    assert len(server.seen) == 3 and "retry 2 of 2" in caplog.text and MASK in caplog.text
    assert_no_secret(caplog.text)


def test_credentials_in_the_base_url_are_redacted(server: EchoServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unrelated-key-0000")
    url = server.url.replace("http://", f"http://user:{SECRET}@") + "/v1"
    judge = OpenAIJudge(model="judge", base_url=url, max_retries=0, requests_per_minute=None,
                        cache_dir=tmp_path / "cache", workers=1)
    with pytest.raises(JudgeRequestError) as info:
        judge.judge([ITEM])
    assert "HTTP 500" in str(info.value) and f"http://{MASK}@127.0.0.1" in str(info.value)
    assert_no_secret("".join(traceback.format_exception(info.value)), json.dumps(judge.identity()))


@pytest.mark.parametrize("mode", ["500", "garbage", "missing"])
def test_perspective_errors_are_redacted(server: EchoServer, tmp_path: Path, monkeypatch, caplog, mode: str) -> None:
    """The Perspective scorer sends its key as ``?key=``; the echoed request line must not expose it."""
    from bench.toxicity.perspective import PerspectiveError, PerspectiveScorer

    monkeypatch.setenv("PERSPECTIVE_API_KEY", SECRET)
    server.mode = mode
    scorer = PerspectiveScorer(qps=0, base_url=f"{server.url}/analyze", max_retries=0, use_cache=False)
    with caplog.at_level("DEBUG"), pytest.raises(PerspectiveError) as info:
        scorer.score(["some text"])
    assert any(f"key={SECRET}" in seen for seen in server.seen)
    assert ("HTTP 500" if mode == "500" else "unexpected Perspective response") in str(info.value)
    assert_no_secret("".join(traceback.format_exception(info.value)), caplog.text)


HF_SCRIPT = textwrap.dedent("""
    import traceback, torch
    from bench.judges.hf_judge import _load
    from bench.models import ModelNotAvailableError
    try:
        _load("someorg/some-judge", "cpu", torch.float32)
    except ModelNotAvailableError as err:
        print("MESSAGE:", err)
        traceback.print_exception(err)
""")


def test_hf_judge_load_error_is_redacted(server: EchoServer, tmp_path: Path) -> None:
    """The Hub (here: the echo server, HTTP 401) answers the token back; the message and traceback hide it."""
    server.mode = "401"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=server.url, HF_TOKEN=HF_SECRET, HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", HF_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    output = done.stdout + done.stderr
    assert "MESSAGE: could not load the judge model 'someorg/some-judge'" in output and "401" in output, output
    assert any(HF_SECRET in seen for seen in server.seen)
    assert HF_SECRET not in output and f"authorization: {MASK}" in output.lower()


# --------------------------------------------------------------------------- the helper itself

REDACT_CASES = [
    ("header line", "Authorization: Bearer sk-test-SECRET123\r\nHost: x", "Authorization: ***\r\nHost: x"),
    ("json header", '{"authorization": "Bearer abc.def", "token": " yes"}',
     '{"authorization": "***", "token": " yes"}'),
    ("api-key header", "{'api-key': 'abcdef', 'x-api-key': 'ghijkl'}", "{'api-key': '***', 'x-api-key': '***'}"),
    ("bearer alone", "sent Bearer abcd1234 to the server", "sent Bearer *** to the server"),
    ("query key", "GET https://x.org/a?key=abc123&alt=json", "GET https://x.org/a?key=***&alt=json"),
    ("query token", "https://x.org/a?b=1&access_token=abc&token=def", "https://x.org/a?b=1&access_token=***&token=***"),
    ("url credentials", "http://user:pa55w0rd@host:80/v1", "http://***@host:80/v1"),
    ("known secret", "the key my-own-secret-value was wrong", "the key *** was wrong"),
    ("url-quoted secret", "sent a%2Fb%2Bc%3Dd to /x", "sent *** to /x"),
    ("key shapes", "sk-abcdefghijklmnopqrstuv and hf_abcdefghijklmnopqrstuvwxyz", "*** and ***"),
    ("harmless text", "Token limit exceeded; Basic information; 'token': ' no'",
     "Token limit exceeded; Basic information; 'token': ' no'"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in REDACT_CASES], ids=[c[0] for c in REDACT_CASES])
def test_redact(text: str, expected: str) -> None:
    assert redact(text, ["my-own-secret-value", "a/b+c=d", None, ""]) == expected


def test_environment_secrets_and_redacted_exceptions(monkeypatch) -> None:
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "AIzaSyFAKE-perspective-key")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not credentials: their values stay
    monkeypatch.setenv("HF_TOKEN_PATH", "/somewhere/hf/token-file")
    assert redact("key AIzaSyFAKE-perspective-key, false, /somewhere/hf/token-file") == (
        "key ***, false, /somewhere/hf/token-file")
    try:
        raise ValueError(f"could not use {SECRET}")
    except ValueError as err:
        stand_in = redacted(err, [SECRET])
    assert str(stand_in) == "ValueError: could not use ***" and stand_in.__traceback__ is not None
