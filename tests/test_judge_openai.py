"""The openai judge against a real local HTTP server speaking OpenAI's JSON format (no mocks)."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.judges.base import JudgeItem
from bench.judges.openai_judge import JudgeRequestError, OpenAIJudge

KEY = "sk-test-secret"
ITEMS = [
    JudgeItem("What is the capital of France?", "Paris.", ("Paris",), ("Lyon",)),
    JudgeItem("Where do rainbows end?", "", ("Nowhere",), ("At a pot of gold",)),  # empty answer
]

# (status, body, headers, delay in seconds); a callable builds a success body from (path, payload).
Action = tuple[int, str, dict, float]


def completion_body(text: str, top: dict[str, float]) -> str:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "judge",
                       "choices": [{"index": 0, "text": text, "finish_reason": "length",
                                    "logprobs": {"tokens": [text], "token_logprobs": [top.get(text, -9.0)],
                                                 "top_logprobs": [top], "text_offset": [0]}}]})


def chat_body(content: str, logprobs: list[dict] | None = None) -> str:
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content},
              "logprobs": {"content": logprobs} if logprobs is not None else None}
    return json.dumps({"id": "chat-1", "object": "chat.completion", "created": 0, "model": "judge",
                       "choices": [choice]})


class FakeOpenAI:
    """Scripted server state: queued actions first, then ``respond(path, payload)`` for a 200 body."""

    def __init__(self) -> None:
        self.script: list[Action] = []
        self.requests: list[tuple[str, dict, dict]] = []
        self.respond: Callable[[str, dict], str] = lambda path, payload: chat_body("truthful: yes\ninformative: yes")
        self.lock = threading.Lock()
        self.url = ""

    def next_action(self, path: str, payload: dict) -> Action:
        with self.lock:
            if self.script:
                return self.script.pop(0)
        return 200, self.respond(path, payload), {}, 0.0


@pytest.fixture()
def server():
    state = FakeOpenAI()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            payload = json.loads(raw or b"{}")
            with state.lock:
                state.requests.append((self.path, payload, {k.lower(): v for k, v in self.headers.items()}))
            status, body, headers, delay = state.next_action(self.path, payload)
            time.sleep(delay)
            try:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (timeout test)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def make_judge(url: str, tmp_path: Path, **options) -> OpenAIJudge:
    defaults = dict(model="judge", base_url=url, cache_dir=tmp_path / "cache", requests_per_minute=None,
                    backoff=0.01, max_retries=3, timeout=5.0, workers=1)
    return OpenAIJudge(**{**defaults, **options})


def test_completion_protocol_probabilities(server: FakeOpenAI, tmp_path: Path) -> None:
    tops = {"True:": {" yes": -0.2, " no": -1.8},  # " yes" present: exp(-0.2)
            "Helpful:": {" no": -0.1, " maybe": -3.0}}  # only " no": 1 - exp(-0.1)

    def respond(path: str, payload: dict) -> str:
        assert path == "/v1/completions"
        assert payload["max_tokens"] == 1 and payload["temperature"] == 0 and payload["logprobs"] >= 2
        suffix = payload["prompt"].rsplit("\n", 1)[1]
        return completion_body(" yes" if suffix == "True:" else " no", tops[suffix])

    server.respond = respond
    judge = make_judge(server.url, tmp_path, protocol="completion", truth_model="gpt-judge", info_model="gpt-info")
    verdicts = judge.judge(ITEMS)
    assert len(verdicts) == 2
    for v in verdicts:
        assert v.p_true == math.exp(-0.2) and v.true
        assert v.p_info == 1 - math.exp(-0.1) and not v.info
    prompts = {(p["model"], p["prompt"]) for _, p, _ in server.requests}
    assert ("gpt-judge", "Q: Where do rainbows end?\nA: \nTrue:") in prompts
    assert ("gpt-info", "Q: What is the capital of France?\nA: Paris.\nHelpful:") in prompts
    assert all(h["authorization"] == f"Bearer {KEY}" for _, _, h in server.requests)
    ident = judge.identity()
    assert ident == {"backend": "openai", "base_url": server.url, "model": "judge", "truth_model": "gpt-judge",
                     "info_model": "gpt-info", "protocol": "completion", "threshold": 0.5}


def test_completion_falls_back_to_text(server: FakeOpenAI, tmp_path: Path) -> None:
    server.respond = lambda path, payload: completion_body(" yes", {" Yes": -0.5, "yes": -1.0})
    [verdict] = make_judge(server.url, tmp_path, protocol="completion").judge(ITEMS[:1])
    assert verdict.p_true == 1.0 and verdict.p_info == 1.0


def test_chat_protocol(server: FakeOpenAI, tmp_path: Path) -> None:
    server.respond = lambda path, payload: chat_body("truthful: yes\ninformative: no")
    verdicts = make_judge(server.url, tmp_path).judge(ITEMS)
    assert [(v.p_true, v.p_info) for v in verdicts] == [(1.0, 0.0), (1.0, 0.0)]
    path, payload, _ = server.requests[0]
    assert path == "/v1/chat/completions" and payload["temperature"] == 0
    prompt = payload["messages"][-1]["content"]
    for text in ("What is the capital of France?", "- Paris", "- Lyon", "Candidate answer: Paris.", "no comment"):
        assert text in prompt
    assert KEY not in json.dumps(make_judge(server.url, tmp_path).identity())


def test_chat_logprobs(server: FakeOpenAI, tmp_path: Path) -> None:
    tokens = [("truth", None), ("ful", None), (":", None), (" yes", [(" yes", -0.3), (" no", -1.5)]), ("\n", None),
              ("inform", None), ("ative", None), (":", None), (" no", [(" no", -0.2), (" Yes", -2.0), (" maybe", -4)])]
    logprobs = [{"token": t, "logprob": (top[0][1] if top else 0.0), "bytes": None,
                 "top_logprobs": [{"token": a, "logprob": lp, "bytes": None} for a, lp in (top or [])]}
                for t, top in tokens]
    server.respond = lambda path, payload: chat_body("".join(t for t, _ in tokens), logprobs)
    [verdict] = make_judge(server.url, tmp_path).judge(ITEMS[:1])
    yes, no = math.exp(-0.3), math.exp(-1.5)
    assert verdict.p_true == pytest.approx(yes / (yes + no), abs=1e-12)
    yes, no = math.exp(-2.0), math.exp(-0.2)
    assert verdict.p_info == pytest.approx(yes / (yes + no), abs=1e-12)


def test_chat_unparseable_reply(server: FakeOpenAI, tmp_path: Path) -> None:
    server.respond = lambda path, payload: chat_body("I think it is mostly fine.")
    with pytest.raises(JudgeRequestError, match="I think it is mostly fine"):
        make_judge(server.url, tmp_path).judge(ITEMS[:1])


def test_retries_429_then_500_then_success(server: FakeOpenAI, tmp_path: Path) -> None:
    server.script = [(429, '{"error": {"message": "slow down"}}', {"retry-after-ms": "20"}, 0.0),
                     (500, '{"error": {"message": "boom"}}', {"retry-after": "0.02"}, 0.0)]
    start = time.monotonic()
    [verdict] = make_judge(server.url, tmp_path, max_retries=2, backoff=30.0).judge(ITEMS[:1])
    assert time.monotonic() - start < 5  # Retry-After (20 ms) wins over the 30 s backoff
    assert verdict.true and verdict.info
    assert len(server.requests) == 3


def test_retries_exhausted_on_5xx(server: FakeOpenAI, tmp_path: Path) -> None:
    server.script = [(503, "overloaded", {}, 0.0)] * 3
    with pytest.raises(JudgeRequestError, match=r"chat/completions failed after 2 attempts: HTTP 503"):
        make_judge(server.url, tmp_path, max_retries=1).judge(ITEMS[:1])
    assert len(server.requests) == 2


def test_client_error_is_not_retried(server: FakeOpenAI, tmp_path: Path) -> None:
    server.script = [(401, '{"error": {"message": "bad key"}}', {}, 0.0)]
    with pytest.raises(JudgeRequestError, match="HTTP 401.*bad key"):
        make_judge(server.url, tmp_path).judge(ITEMS[:1])
    assert len(server.requests) == 1


def test_timeout(server: FakeOpenAI, tmp_path: Path) -> None:
    server.script = [(200, chat_body("truthful: yes\ninformative: yes"), {}, 1.5)] * 2
    start = time.monotonic()
    with pytest.raises(JudgeRequestError) as err:
        make_judge(server.url, tmp_path, timeout=0.4, max_retries=1).judge(ITEMS[:1])
    assert f"{server.url}/chat/completions" in str(err.value) and "2 attempts" in str(err.value)
    assert "Timeout" in str(err.value)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("body", ["<html>Bad gateway</html>", '{"unexpected": true}', '{"choices": []}'])
def test_malformed_body(server: FakeOpenAI, tmp_path: Path, body: str) -> None:
    server.respond = lambda path, payload: body
    with pytest.raises(JudgeRequestError) as err:
        make_judge(server.url, tmp_path).judge(ITEMS[:1])
    assert f"{server.url}/chat/completions" in str(err.value) and body[:10] in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are never cached


def test_missing_api_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(JudgeRequestError, match="JUDGE_TEST_KEY"):
        make_judge("http://127.0.0.1:9/v1", tmp_path, api_key_env="JUDGE_TEST_KEY")


def test_missing_model_and_bad_protocol(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model="):
        make_judge("http://127.0.0.1:9/v1", tmp_path, model=None)
    with pytest.raises(ValueError, match="protocol"):
        make_judge("http://127.0.0.1:9/v1", tmp_path, protocol="telepathy")


def test_cache_prevents_new_requests(server: FakeOpenAI, tmp_path: Path) -> None:
    server.respond = lambda path, payload: completion_body(" yes", {" yes": -0.7, " no": -0.9})
    first = make_judge(server.url, tmp_path, protocol="completion").judge(ITEMS)
    assert len(server.requests) == 4
    again = make_judge(server.url, tmp_path, protocol="completion").judge(ITEMS)  # a fresh judge: a re-run
    assert again == first and len(server.requests) == 4
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 4 and not list((tmp_path / "cache").rglob(".*"))  # no temp files left behind
    assert all(KEY not in f.read_text() for f in files)
    make_judge(server.url, tmp_path, protocol="completion", model="other").judge(ITEMS[:1])
    assert len(server.requests) == 6  # another model is another key


def test_unreachable_endpoint(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a free port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeRequestError) as err:
        make_judge(url, tmp_path, max_retries=2).judge(ITEMS[:1])
    assert f"{url}/chat/completions failed after 3 attempts" in str(err.value)


def test_rate_limiter_spaces_requests() -> None:
    from bench.judges.openai_judge import RateLimiter

    limiter = RateLimiter(1200)  # one per 50 ms
    start = time.monotonic()
    threads = [threading.Thread(target=limiter.acquire) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start >= 0.19
