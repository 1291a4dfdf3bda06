"""``chspawner pull``: images from any OCI distribution (v2) registry.

* anonymous, basic and bearer-token auth, with credentials from
  ``CHSPAWNER_REGISTRY_USER``/``CHSPAWNER_REGISTRY_PASSWORD`` or the usual
  ``~/.docker/config.json`` (``$DOCKER_CONFIG``);
* Docker v2 and OCI manifests, manifest lists and image indexes (the
  platform picked by ``arch``, default this machine's);
* every manifest and blob checked against its sha256 digest;
* layers downloaded in parallel into a cache shared by all pulls
  (``dlcache/`` in the store), resumed with HTTP ranges after an
  interruption, and applied in order as soon as each is ready.

Errors are :class:`PullError`: one line naming the registry, the reference
and what went wrong (HTTP status, digest mismatch, network).
"""
from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from chspawner.images import ImageError, layout
from chspawner.images.progress import ByteCounter, Progress, ProgressCallback, no_progress
from chspawner.images.store import Store, write_metadata
from chspawner.images.streams import Sha256Tap
from chspawner.images.unpack import ImageWriter, UnpackError

DOCKER_HUB = "registry-1.docker.io"
ACCEPT_MANIFESTS = ", ".join(layout.INDEX_TYPES + layout.MANIFEST_TYPES)
CHUNK = 1 << 20


class PullError(ImageError):
    """A pull failed; one line."""


@dataclass(frozen=True)
class Reference:
    """``[registry/]repository[:tag][@digest]``, with Docker's defaults."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        rest, _, digest = text.partition("@")
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, remainder
        else:
            registry, path = DOCKER_HUB, rest
            if "/" not in path:
                path = f"library/{path}"
        name, colon, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] \
            else (path, "", "")
        if not re.fullmatch(r"[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*",
                            name):
            raise PullError(f"{text}: invalid repository name {name!r}")
        if digest:
            try:
                layout.check_digest(digest)
            except layout.LayoutError as e:
                raise PullError(f"{text}: {e}") from None
        return cls(registry, name, tag or (None if digest else "latest"), digest or None)

    @property
    def reference(self) -> str:
        """What to ask the registry's manifests endpoint for."""
        return self.digest or self.tag

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        return text + (f"@{self.digest}" if self.digest else "")


def credentials(registry: str) -> tuple[str, str] | None:
    """(user, password) for ``registry``, from the environment or Docker's
    config file; None for anonymous access."""
    user = os.environ.get("CHSPAWNER_REGISTRY_USER")
    if user is not None:
        return user, os.environ.get("CHSPAWNER_REGISTRY_PASSWORD", "")
    config_dir = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
    try:
        with open(os.path.join(config_dir, "config.json")) as f:
            auths = json.load(f).get("auths") or {}
    except (OSError, ValueError):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        keys += ["https://index.docker.io/v1/", "docker.io"]
    for key in keys:
        entry = auths.get(key) or auths.get(key + "/")
        if not entry:
            continue
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {...})."""
    scheme, _, params = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params))


class Client:
    """One registry session: auth handled on the first 401, then reused."""

    def __init__(self, ref: Reference, session: aiohttp.ClientSession, insecure: bool):
        self.ref = ref
        self.session = session
        self.base = f"{'http' if insecure else 'https'}://{ref.registry}/v2/{ref.repository}"
        self.auth_header: str | None = None
        self.creds = credentials(ref.registry)

    def error(self, what: str) -> PullError:
        return PullError(f"{self.ref}: {what}")

    async def get(self, path: str, headers: dict | None = None) -> aiohttp.ClientResponse:
        """GET, authenticating once if the registry asks. The caller reads
        and releases the response."""
        for attempt in range(2):
            sent = dict(headers or {})
            if self.auth_header:
                sent["Authorization"] = self.auth_header
            try:
                response = await self.session.get(self.base + path, headers=sent)
            except aiohttp.ClientError as e:
                raise self.error(f"can't reach registry {self.ref.registry}: {e}") from None
            if response.status != 401 or attempt:
                break
            challenge = response.headers.get("WWW-Authenticate", "")
            response.release()
            await self.authenticate(challenge)
        if response.status >= 400:
            detail = await _error_detail(response)
            response.release()
            raise self.error(f"HTTP {response.status} {response.reason}{detail}")
        return response

    async def authenticate(self, challenge: str) -> None:
        scheme, params = _challenge(challenge)
        if scheme == "basic":
            if not self.creds:
                raise self.error("HTTP 401 Unauthorized: the registry wants a "
                                 "password (set CHSPAWNER_REGISTRY_USER and "
                                 "CHSPAWNER_REGISTRY_PASSWORD, or docker login)")
            self.auth_header = aiohttp.BasicAuth(*self.creds).encode()
        elif scheme == "bearer" and params.get("realm"):
            self.auth_header = f"Bearer {await self.token(params)}"
        else:
            raise self.error(f"HTTP 401 Unauthorized: unsupported challenge "
                             f"{challenge[:80]!r}")

    async def token(self, params: dict[str, str]) -> str:
        query = {"service": params.get("service", ""),
                 "scope": params.get("scope")
                 or f"repository:{self.ref.repository}:pull"}
        auth = aiohttp.BasicAuth(*self.creds) if self.creds else None
        try:
            async with self.session.get(params["realm"], params=query, auth=auth) as r:
                if r.status >= 400:
                    raise self.error(f"token server {params['realm']}: HTTP {r.status} "
                                     f"{r.reason}{await _error_detail(r)}")
                body = await r.json(content_type=None)
        except aiohttp.ClientError as e:
            raise self.error(f"can't reach token server {params['realm']}: {e}") from None
        token = body.get("token") or body.get("access_token")
        if not token:
            raise self.error(f"token server {params['realm']} sent no token")
        return token

    async def manifest(self, reference: str) -> tuple[dict, str]:
        """(manifest or index, its digest), checked when asked by digest."""
        response = await self.get(f"/manifests/{reference}",
                                  {"Accept": ACCEPT_MANIFESTS})
        async with response:
            data = await response.read()
        digest = _sha256(data)
        if reference.startswith("sha256:") and digest != reference:
            raise self.error(f"manifest {reference}: digest mismatch (got {digest})")
        try:
            return layout.load_json(data, "manifest"), digest
        except layout.LayoutError as e:
            raise self.error(str(e)) from None

    async def small_blob(self, digest: str) -> bytes:
        response = await self.get(f"/blobs/{digest}")
        async with response:
            data = await response.read()
        if _sha256(data) != digest:
            raise self.error(f"blob {digest}: digest mismatch (got {_sha256(data)})")
        return data

    async def download(self, digest: str, final: Path, counter: ByteCounter) -> None:
        """Fetch a blob into the cache: resume a partial download, check the
        digest, and only then give it its final name."""
        partial = final.with_name(final.name + ".partial")
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "r+b") as f:
            # One downloader per blob, even across concurrent pulls.
            await asyncio.to_thread(fcntl.flock, f.fileno(), fcntl.LOCK_EX)
            if final.exists():
                return
            hasher = Sha256Tap()
            have = 0
            while chunk := f.read(CHUNK):
                hasher(chunk)
                have += len(chunk)
            headers = {"Range": f"bytes={have}-"} if have else {}
            response = await self.get(f"/blobs/{digest}", headers)
            async with response:
                if have and response.status != 206:  # no range support: restart
                    f.seek(0)
                    f.truncate()
                    hasher, have = Sha256Tap(), 0
                counter.add(have)
                try:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        f.write(chunk)
                        hasher(chunk)
                        counter.add(len(chunk))
                except aiohttp.ClientError as e:
                    raise self.error(f"blob {digest}: download interrupted "
                                     f"({e}); pull again to resume") from None
            f.flush()
            if hasher.digest != digest:
                os.unlink(partial)
                raise self.error(f"blob {digest}: digest mismatch (got {hasher.digest})")
            os.rename(partial, final)


async def _error_detail(response: aiohttp.ClientResponse) -> str:
    """The registry's own error message, if it sent one (distribution spec
    ``{"errors": [{"code", "message"}]}``)."""
    try:
        body = await response.json(content_type=None)
        error = body["errors"][0]
        return f" ({error.get('message') or error.get('code')})"
    except Exception:
        return ""


def _sha256(data: bytes) -> str:
    tap = Sha256Tap()
    tap(data)
    return tap.digest


def cache_path(store: Store, digest: str) -> Path:
    return store.dlcache / layout.check_digest(digest).replace(":", "-")


async def pull_async(text: str, name: str, store: Store, arch: str | None = None,
                     insecure: bool = False, jobs: int = 4,
                     progress: ProgressCallback = no_progress) -> Path:
    ref = Reference.parse(text)
    progress(Progress("resolve", f"resolving {ref}", 0, None, ""))
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = Client(ref, session, insecure)
        manifest, digest = await client.manifest(ref.reference)
        if manifest.get("mediaType") in layout.INDEX_TYPES or "manifests" in manifest:
            try:
                chosen = layout.pick_platform(manifest, arch, str(ref))
                digest = layout.check_digest(chosen.get("digest"))
            except layout.LayoutError as e:
                raise PullError(str(e)) from None
            manifest, digest = await client.manifest(digest)
        try:
            config_digest = layout.check_digest((manifest.get("config") or {}).get("digest"))
            blobs = [(layout.check_digest(d.get("digest")), int(d.get("size") or 0))
                     for d in manifest.get("layers") or []]
        except (layout.LayoutError, TypeError, ValueError) as e:
            raise client.error(f"malformed manifest: {e}") from None
        config = layout.load_json(await client.small_blob(config_digest), "config")

        store.dlcache.mkdir(parents=True, exist_ok=True)
        paths = [cache_path(store, d) for d, _ in blobs]
        missing = [(d, s, p) for (d, s), p in zip(blobs, paths) if not p.exists()]
        downloads_counter = ByteCounter(
            progress, "download", f"downloading {len(missing)} of {len(blobs)} layers",
            sum(s for _, s, _ in missing))
        semaphore = asyncio.Semaphore(jobs)

        async def fetch(digest: str, path: Path) -> None:
            async with semaphore:
                await client.download(digest, path, downloads_counter)

        tasks = {p: asyncio.create_task(fetch(d, p)) for d, _, p in missing}
        try:
            with store.new_image(name) as image:
                unpack_counter = ByteCounter(progress, "unpack",
                                             f"unpacking {len(blobs)} layers",
                                             sum(s for _, s in blobs))
                with ImageWriter(str(image)) as writer:
                    # Apply each layer as soon as it (and those below) are in.
                    for (blob_digest, size), path in zip(blobs, paths):
                        if path in tasks:
                            await tasks[path]
                        layer = layout.Layer(path, size)  # checked on download
                        try:
                            await asyncio.to_thread(layer.apply, writer, unpack_counter.add)
                        except (UnpackError, layout.LayoutError) as e:
                            raise client.error(f"layer {blob_digest}: {e}") from None
                    writer.finish()
                downloads_counter.finish()
                unpack_counter.finish()
                write_metadata(image, config.get("config") or {},
                               {"kind": "registry", "ref": str(ref), "digest": digest},
                               arch=config.get("architecture"), history=config.get("history"))
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
    progress(Progress("done", f"pulled {ref} as {name}", 1, 1, ""))
    return store.path(name)


def pull(text: str, name: str | None, store: Store, **kwargs) -> Path:
    """Pull ``text`` into the store as ``name`` (default: the reference)."""
    return asyncio.run(pull_async(text, name or default_name(text), store, **kwargs))


def default_name(text: str) -> str:
    """The store name for a reference: as written, with the tag made explicit."""
    ref = Reference.parse(text)
    if ref.digest or ":" in text.rsplit("/", 1)[-1]:
        return text
    return f"{text}:latest"
