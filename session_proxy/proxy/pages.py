"""The answers the proxy makes itself (404, 503, 400): a small HTML page,
or configurable-http-proxy's way, the page that
``<error-target>/<code>?url=<path>`` returns when there is an error target.
Shared by both request paths (``app`` and ``fastpath``)."""
from __future__ import annotations

import logging
from html import escape
from urllib.parse import quote

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.iostream import StreamClosedError

log = logging.getLogger("session_proxy")


def html_page(code: int, text: str) -> bytes:
    """``text`` shown as a small HTML page."""
    return f"<!DOCTYPE html><title>{code}</title><p>{escape(text)}</p>\n".encode()


async def error_page(error_target: str | None, code: int, path: str) -> tuple[bytes, str]:
    """The body and content type of the error page for ``code``."""
    if error_target:
        url = f"{error_target.rstrip('/')}/{code}?url={quote(path, safe='')}"
        try:
            reply = await AsyncHTTPClient().fetch(url, request_timeout=10, raise_error=False)
            if reply.body:
                return reply.body, reply.headers.get("Content-Type", "text/html")
        except (OSError, HTTPClientError, StreamClosedError) as error:
            log.warning("error target %s: %s", url, error)
    return (html_page(code, f"{code} {httputil.responses.get(code, '')}"),
            "text/html; charset=utf-8")
