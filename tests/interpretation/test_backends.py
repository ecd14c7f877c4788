"""The explainer backends: LocalChat on a tiny random model, and OpenAIChat against a real HTTP server on
127.0.0.1 (tests/chat_server.py) that answers with that same model: retries, timeouts, bad answers, the key."""

from __future__ import annotations

import socket

import pytest

from chat_server import ChatServer
from midisc.interpretation.backends import BackendError, LocalChat, OpenAIChat, shown_url

ASK = [[{"role": "user", "content": "Say something about cats."}],
       [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And a much longer question about "
                                                                              "the dogs of the town?"}],
       [{"role": "user", "content": "Yes or no?"}]]


@pytest.fixture(scope="module")
def local(tiny_llama):
    return LocalChat(str(tiny_llama), batch_size=2, max_new_tokens=6)


def test_a_batch_answers_as_each_conversation_alone(local):
    together = local.complete(ASK)
    alone = [local.complete([c])[0] for c in ASK]
    assert together == alone and all(isinstance(a, str) for a in together)
    p_together, p_alone = local.yes_probability(ASK), [local.yes_probability([c])[0] for c in ASK]
    assert p_together == pytest.approx(p_alone, abs=1e-4) and all(0 <= p <= 1 for p in p_together)
    assert local.tokens > 0 and local.label == f"local:{local.name}"


def test_the_endpoint_answers_what_the_model_answers_and_gets_the_key(local, monkeypatch):
    monkeypatch.setenv("MIDISC_TEST_KEY", "sk-test-123")
    with ChatServer(local) as server:
        chat = OpenAIChat(server.url, "tiny", api_key_env="MIDISC_TEST_KEY", concurrency=3, max_tokens=6)
        assert chat.complete(ASK) == local.complete(ASK)
        assert chat.tokens == 15 * len(ASK)  # from each answer's usage
        assert {r["headers"]["Authorization"] for r in server.requests} == {"Bearer sk-test-123"}
        assert {r["body"]["model"] for r in server.requests} == {"tiny"}
        assert "sk-test" not in repr(chat)


def test_a_flaky_endpoint_is_retried_with_backoff(local):
    with ChatServer(local, mode="flaky", flaky=2) as server:
        chat = OpenAIChat(server.url, "tiny", retries=3, backoff_s=0.01, concurrency=1, max_tokens=4)
        assert chat.complete(ASK[:1]) == local.complete(ASK[:1], max_tokens=4)
        assert len(server.requests) == 3


@pytest.mark.parametrize("mode, says", [
    ("fail", "answered HTTP 500 2 times: '{\"error\": \"overloaded\"}'"),
    ("garbage", "answered something that is not an OpenAI chat completion: '<html>not json</html>'"),
    ("slow", "did not answer after 1 tries (ReadTimeout); is the server running there?"),
])
def test_a_failing_endpoint_is_one_line_naming_it_and_never_the_key(local, monkeypatch, mode, says):
    monkeypatch.setenv("MIDISC_TEST_KEY", "sk-secret-999")
    with ChatServer(local, mode=mode) as server:
        chat = OpenAIChat(server.url, "tiny", api_key_env="MIDISC_TEST_KEY", retries=1 if mode == "fail" else 0,
                          backoff_s=0.01, timeout_s=0.5)
        with pytest.raises(BackendError) as caught:
            chat.complete(ASK[:1])
    message = str(caught.value)
    assert says in message and server.url in message and "\n" not in message and "sk-secret" not in message


def test_nothing_listening_is_said_plainly():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chat = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff_s=0.01)
    with pytest.raises(BackendError, match=r"did not answer after 2 tries \(ConnectError\); is the server running"):
        chat.complete(ASK[:1])


def test_bad_settings_are_refused_and_urls_are_shown_without_credentials():
    with pytest.raises(BackendError, match="must start with http:// or https://"):
        OpenAIChat("localhost:8000", "m")
    with pytest.raises(BackendError, match="concurrency=0 must be >= 1"):
        OpenAIChat("http://x/v1", "m", concurrency=0)
    assert shown_url("https://user:pw@api.example.com:8443/v1?key=abc") == "https://api.example.com:8443/v1"
