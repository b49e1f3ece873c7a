"""
Notices
=======

A stand-in for a cloud's metadata server that announces spot preemptions, for tests and experiments on one
machine (never a real metadata address): ``NoticeServer`` answers, per peer name, the way AWS serves
``spot/instance-action`` with IMDSv2 (``PUT /NAME/latest/api/token`` gives a session token; ``GET
/NAME/latest/meta-data/spot/instance-action`` answers 404 until ``arm(NAME)``, then the notice; 401 without the
token). Peers are pointed at it with ``swarm.preemption.provider=aws swarm.preemption.url=`` ``server.url``
(``{name}`` in it is each peer's own name).
"""

from __future__ import annotations

import http.server
import json
import threading


class NoticeServer:
    def __init__(self, host: str = "127.0.0.1"):
        armed, reads = self.armed, self.reads = set(), []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                name = self.path.split("/")[1]
                if self.path.endswith("/latest/api/token"):
                    self._reply(200, f"token-{name}".encode())
                else:
                    self._reply(404)

            def do_GET(self):
                name = self.path.split("/")[1]
                reads.append(name)
                if self.headers.get("X-aws-ec2-metadata-token") != f"token-{name}":
                    self._reply(401)
                elif name in armed and self.path.endswith("/spot/instance-action"):
                    self._reply(200, json.dumps({"action": "terminate", "time": "2026-11-29T13:00:00Z"}).encode())
                else:
                    self._reply(404)

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_port}/{{name}}/latest/meta-data/spot/instance-action"
        threading.Thread(target=self.server.serve_forever, name="notices", daemon=True).start()

    def arm(self, name: str) -> None:
        """From now on, peer ``name`` reads a preemption notice."""
        self.armed.add(name)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> NoticeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
