"""Helpers for driving a running server over real sockets (no test client in between)."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse


def request(url: str, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, bytes]:
    """One HTTP request; returns (status, headers, body bytes)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body)
        headers = {"Content-Type": "application/json", **(headers or {})}
    if isinstance(body, str):
        body = body.encode("utf-8")
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(url: str, path: str, body: dict, headers: dict | None = None, timeout: float = 120):
    status, hdrs, data = request(url, "POST", path, body, headers, timeout)
    return status, hdrs, json.loads(data) if data else None


class SSEResult:
    def __init__(self):
        self.status = None
        self.events: list[dict] = []
        self.done = False  # saw data: [DONE]
        self.error_body = None


def stream(url: str, path: str, body: dict, headers: dict | None = None, *, stop_after: int | None = None,
           timeout: float = 300) -> SSEResult:
    """POSTs a streaming request and reads its server-sent events. With `stop_after`, drops the
    connection abruptly after that many events (a client going away mid-stream)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    out = SSEResult()
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json", **(headers or {})})
        sock = conn.sock  # the response takes it over; kept to cut the connection
        resp = conn.getresponse()
        out.status = resp.status
        if resp.status != 200:
            out.error_body = json.loads(resp.read() or b"null")
            return out
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                out.done = True
                break
            out.events.append(json.loads(data))
            if stop_after is not None and len(out.events) >= stop_after:
                sock.shutdown(socket.SHUT_RDWR)
                break
        return out
    finally:
        conn.close()


def wait_until(predicate, timeout: float = 60, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def all_pages_free(engine) -> bool:
    """Every KV page of every replica is free or cached-free (none held by a request)."""
    return all(kv.num_free_blocks == kv.pool.num_blocks - 1 for kv in engine.kv_managers)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
