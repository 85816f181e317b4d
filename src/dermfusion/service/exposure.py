"""What the service exposes to the network, and the connection-level timeouts uvicorn does not have.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a *new* connection that sends nothing,
or trickles its header a byte at a time, is kept open for as long as the client likes — enough such sockets fill the
connection cap, and then even ``/healthz`` gets uvicorn's bare 503. ``guarded_h11`` is uvicorn's h11 protocol with a
**header timeout**: a new connection, and a kept-alive one from the first byte of its next request, must deliver the
complete request head within ``workers.header_timeout_s``, else the client gets a 408 and the connection is closed
(an idle kept-alive connection is closed by uvicorn's ``timeout_keep_alive``). The body's own deadline is the
middleware's (``workers.request_timeout_s``: 408).

``exposure_warnings`` lists what an operator must hear at start: listening beyond loopback without TLS (keys and
patient data in clear text), without keys, with plain-text keys in the config, or storing images with no retention.
"""
from __future__ import annotations

import ipaddress
import json

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def guarded_h11(header_timeout_s: float):
    """uvicorn's h11 protocol class with a header timeout (pass as ``uvicorn.Config(http=…)``)."""
    import h11  # uvicorn's dependency: imported with the server, not with the service config
    from uvicorn.protocols.http.h11_impl import H11Protocol  # the serve extra, only when a server is built

    body = json.dumps({"error": {"code": "request_timeout", "message": "the request header did not arrive within "
                                 f"{header_timeout_s:g} s"}, "request_id": None}).encode()
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first byte of a kept-alive connection's next request head
            super().data_received(data)

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection is over)
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _header_timeout(self):
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            self.transport.write(reply)
            self.transport.close()

    GuardedH11Protocol.__name__ = GuardedH11Protocol.__qualname__ = "GuardedH11Protocol"
    return GuardedH11Protocol


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def network_warnings(config, host: str, tls: bool = False, proxy: bool = False) -> list[str]:
    """What ``dermfusion serve`` must say about the address it listens on (empty on loopback)."""
    if is_loopback(host):
        return []
    out = []
    if not tls and not proxy:
        out.append(f"listening on {host} without TLS: API keys, images and results cross the network in clear text. "
                   "Put a TLS reverse proxy in front (docs/SERVICE.md, 'Deployment') and listen on 127.0.0.1, or give "
                   "--ssl-certfile / --ssl-keyfile (or --forwarded-allow-ips for a proxy on another host)")
    if not config.auth.keys:
        out.append(f"listening on {host} without API keys: anyone who reaches this port can analyse images, and "
                   "/metrics is open; configure auth.keys (dermfusion keys new ID --scope analyze)")
    return out


def config_warnings(config) -> list[str]:
    """What the configuration itself puts at risk (logged by ``create_app``)."""
    out = []
    plain = getattr(config.auth, "_plaintext", 0)
    if plain:
        out.append(f"{plain} API key(s) given in plain text (auth.api_keys / a bare DERMFUSION_API_KEYS entry): each "
                   "is read as an analyze-only key; store salted hashes in auth.keys instead (dermfusion keys new)")
    if config.audit.store_images and config.audit.retention_days is None:
        out.append("audit.store_images is on with no audit.retention_days: stored images are kept until deleted by "
                   "hand; set a retention and run `dermfusion audit purge` daily")
    return out


def exposure_warnings(config, host: str, tls: bool = False, proxy: bool = False) -> list[str]:
    """Every warning for serving ``config`` on ``host``."""
    return network_warnings(config, host, tls, proxy) + config_warnings(config)
