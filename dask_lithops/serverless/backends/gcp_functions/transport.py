"""The worker requests' transport: one HTTP/1.1 POST per worker, answered when the worker ends.

A worker holds its request (and so its connection) for its whole lifetime, so
nothing is pooled: each launch opens a connection, writes the request, and
reads the response whenever it comes.  :class:`StreamTransport` does exactly
that with asyncio streams and h11 (the HTTP/1.1 state machine httpx itself is
built on), at a fraction of httpx's per-request CPU -- the launch rate of a
big ``scale()``.  With an ``HTTP(S)_PROXY`` set, :class:`HttpxTransport` goes
through httpx, which honours it.  Cancelling a ``post()`` closes its connection.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.parse

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
               "all_proxy")
CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0


class TransportError(Exception):
    """The request could not be sent or its response not read."""


def make_transport():
    return HttpxTransport() if any(os.environ.get(v) for v in _PROXY_VARS) else StreamTransport()


class StreamTransport:
    def __init__(self):
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def post(self, url: str, body: bytes, headers: dict, *, read_timeout: float,
                   on_sent=None) -> tuple[int, bytes]:
        import h11

        u = urllib.parse.urlsplit(url)
        https = u.scheme == "https"
        port = u.port or (443 if https else 80)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                u.hostname, port, ssl=self._ssl_context() if https else None,
                server_hostname=u.hostname if https else None), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            raise TransportError(f"connecting to {u.netloc}: {type(e).__name__}: {e}") from e
        try:
            conn = h11.Connection(h11.CLIENT)
            target = (u.path or "/") + (f"?{u.query}" if u.query else "")
            fields = [("Host", u.netloc), ("Content-Length", str(len(body))),
                      ("Connection", "close"), *headers.items()]
            writer.write(conn.send(h11.Request(method="POST", target=target, headers=fields))
                         + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
            if on_sent is not None:
                on_sent()
            status, chunks = 0, []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + read_timeout
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536),
                                                  max(0.0, deadline - loop.time()))
                    conn.receive_data(data)  # b"": the server closed the connection
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, b"".join(chunks)
        except asyncio.TimeoutError as e:
            raise TransportError(f"no response from {u.netloc} within "
                                 f"{read_timeout:.0f}s") from e
        except (OSError, ssl.SSLError, h11.ProtocolError) as e:
            raise TransportError(f"request to {u.netloc}: {type(e).__name__}: {e}") from e
        finally:
            writer.close()

    async def aclose(self) -> None:
        pass


class HttpxTransport:
    def __init__(self):
        import httpx

        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            trust_env=True)

    async def post(self, url: str, body: bytes, headers: dict, *, read_timeout: float,
                   on_sent=None) -> tuple[int, bytes]:
        import httpx

        async def trace(event_name: str, info: dict) -> None:
            if event_name.endswith("send_request_body.complete") and on_sent is not None:
                on_sent()

        try:
            r = await self.client.post(
                url, content=body, headers=headers, extensions={"trace": trace},
                timeout=httpx.Timeout(connect=CONNECT_TIMEOUT, write=WRITE_TIMEOUT,
                                      pool=None, read=read_timeout))
        except httpx.HTTPError as e:
            raise TransportError(f"{type(e).__name__}: {e}") from e
        return r.status_code, r.content

    async def aclose(self) -> None:
        await self.client.aclose()
