"""A real OpenAI-compatible chat server on 127.0.0.1 for the tests: POST /v1/chat/completions answered by a local
model through transformers (midisc's own LocalChat around a tiny random model), over a real socket.

`mode` makes it misbehave on purpose: "fail" answers HTTP 500, "flaky" fails the first `flaky` requests and
then answers, "breaks" answers the first `flaky` and fails every one after, "garbage" answers 200 with a body that is not a completion, "slow" sleeps past a client's timeout.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ChatServer:
    def __init__(self, chat: Any, mode: str = "ok", flaky: int = 0) -> None:
        self.chat, self.mode, self.flaky = chat, mode, flaky
        self.requests: list[dict] = []   # each request's headers and body, to check what the client sent
        self._lock = threading.Lock()     # the local model answers one request at a time
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # a client that stops sending cannot hold a thread for ever

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    count = len(server.requests)
                    broken = server.mode == "breaks" and count > server.flaky
                    if server.mode == "fail" or broken or (server.mode == "flaky" and count <= server.flaky):
                        return self._send(500, b'{"error": "overloaded"}')
                    if server.mode == "garbage":
                        return self._send(200, b"<html>not json</html>")
                    if server.mode == "slow":
                        time.sleep(3)
                    if self.path != "/v1/chat/completions":
                        return self._send(404, b'{"error": "no such route"}')
                    text = server.chat.complete([body["messages"]], max_tokens=body.get("max_tokens", 16))[0]
                answer = {"id": f"chat-{count}", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                self._send(200, json.dumps(answer).encode())

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (its timeout): what "slow" is for

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)
