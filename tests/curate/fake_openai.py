"""A small real HTTP server speaking OpenAI's chat-completions protocol, with failures on cue.

The reply to a message is ``FIXED <last paragraph>``. A paragraph may carry cues that make the
server misbehave on its first ``k`` requests for that paragraph: ``[429xk]``, ``[500xk]``,
``[slowxk]`` (answers after ``slow_s``, past the client's timeout), ``[malformedxk]`` (a 200 that
is not JSON), ``[emptyxk]`` (a 200 whose message has no text), ``[lengthxk]`` (a reply cut at ``max_tokens``:
``finish_reason`` "length"). ``die_after`` stops the whole
server after that many requests (a server that dies mid-run).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CUE = re.compile(r"\[(429|500|slow|malformed|empty|length)x(\d+)\]")


class FakeOpenAI:
    def __init__(self, slow_s: float = 2.0, die_after: int | None = None, delay_s: float = 0.0) -> None:
        self.slow_s, self.die_after, self.delay_s = slow_s, die_after, delay_s  # delay_s: before every reply
        self.seen: Counter = Counter()  # paragraph -> requests
        self.requests = 0
        self.bodies: list[dict] = []  # every request body, in order
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
                paragraph = text.split("\n\n")[-1]
                with server.lock:
                    server.bodies.append(body)
                    server.requests += 1
                    n = server.requests
                    server.seen[paragraph] += 1
                    attempt = server.seen[paragraph]
                if server.die_after is not None and n > server.die_after:
                    threading.Thread(target=server.stop, daemon=True).start()
                    self.connection.close()
                    return
                time.sleep(server.delay_s)
                cue = CUE.search(paragraph)
                if cue and attempt <= int(cue[2]):
                    return self._misbehave(cue[1], body, paragraph)
                self._reply(body, f"FIXED {paragraph}")

            def _misbehave(self, kind: str, body: dict, paragraph: str) -> None:
                if kind in ("429", "500"):
                    payload = json.dumps({"error": {"message": kind, "type": "x", "param": None, "code": None}})
                    return self._send(int(kind), payload.encode(), {"Retry-After": "0"} if kind == "429" else {})
                if kind == "slow":
                    time.sleep(server.slow_s)
                    return self._reply(body, f"FIXED {paragraph}")
                if kind == "malformed":
                    return self._send(200, b"<html>upstream error</html>", {"Content-Type": "application/json"})
                if kind == "length":
                    return self._reply(body, f"FIXED {paragraph}"[:12], finish_reason="length")
                self._reply(body, "")

            def _reply(self, body: dict, text: str, finish_reason: str = "stop") -> None:
                payload = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "fake"),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 1},
                }
                self._send(200, json.dumps(payload).encode(), {})

            def _send(self, status: int, data: bytes, headers: dict) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        return Handler
