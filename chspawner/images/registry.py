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
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp

from chspawner.images import ImageError, layout
from chspawner.images.progress import (ByteCounter, Progress, ProgressCallback, Stalled,
                                       StallWatch, no_progress)
from chspawner.images.store import Store, write_metadata
from chspawner.images.streams import Sha256Tap
from chspawner.images.unpack import ImageWriter, UnpackError

DOCKER_HUB = "registry-1.docker.io"
ACCEPT_MANIFESTS = ", ".join(layout.INDEX_TYPES + layout.MANIFEST_TYPES)
CHUNK = 1 << 20

# What a registry may make a pull read into memory. Manifests, indexes and
# configs are JSON read whole; real ones are a few KiB (a config with a long
# history, some hundred KiB). The reference registry (distribution) refuses
# to store a manifest over 4 MiB and containerd reads none bigger, so no
# honest registry serves one; configs get twice that for long histories and
# many labels. Beyond these a pull is refused before or while reading, never
# after holding it all.
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 8 << 20
# A token server's JSON answer (a JWT or two: a few KiB) and a registry's
# error body (one JSON error: a few hundred bytes, shown shortened).
MAX_TOKEN_RESPONSE = 1 << 20
MAX_ERROR_BODY = 64 << 10
# Partial layer downloads kept for a later pull to resume, besides the
# current pull's own (at most one per parallel download, each no bigger
# than its layer's declared size); older ones are deleted.
KEEP_PARTIALS = 4

# The stall deadline of every request and download: fewer than STALL_BYTES
# bytes in any STALL_SECONDS seconds fails the pull. The defaults (64 KiB a
# minute, about 1 KiB/s) pass any working link, even shared by -j downloads,
# and stop a registry that trickles bytes to hold a pull forever.
STALL_SECONDS_ENV = "CHSPAWNER_PULL_STALL_SECONDS"
STALL_BYTES_ENV = "CHSPAWNER_PULL_STALL_BYTES"
DEFAULT_STALL_SECONDS = 60.0
DEFAULT_STALL_BYTES = 64 << 10


class PullError(ImageError):
    """A pull failed; one line."""


@dataclass(frozen=True)
class StallLimit:
    """A request fails when fewer than ``min_bytes`` arrive in ``seconds``."""

    seconds: float = DEFAULT_STALL_SECONDS
    min_bytes: int = DEFAULT_STALL_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> StallLimit:
        """From $CHSPAWNER_PULL_STALL_SECONDS and $CHSPAWNER_PULL_STALL_BYTES,
        the defaults where unset."""
        return cls(_positive(environ, STALL_SECONDS_ENV, float, DEFAULT_STALL_SECONDS),
                   _positive(environ, STALL_BYTES_ENV, int, DEFAULT_STALL_BYTES))


def _positive(environ: Mapping[str, str], name: str, kind: type, default):
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise PullError(f"{name}: expected a positive {'integer' if kind is int else 'number'}"
                        f", got {text!r}")
    return value


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
    """One registry session: auth handled on the first 401, then reused.

    Every request is bounded: bodies read into memory by a cap (and a
    descriptor's declared size), layers by their declared size, and each
    request by the stall deadline of ``limits``.
    """

    def __init__(self, ref: Reference, session: aiohttp.ClientSession, insecure: bool,
                 limits: StallLimit | None = None):
        self.ref = ref
        self.session = session
        self.base = f"{'http' if insecure else 'https'}://{ref.registry}/v2/{ref.repository}"
        self.auth_header: str | None = None
        self.creds = credentials(ref.registry)
        self.limits = limits or StallLimit.from_env()

    def error(self, what: str) -> PullError:
        return PullError(f"{self.ref}: {what}")

    @asynccontextmanager
    async def watched(self, what: str) -> AsyncIterator[StallWatch]:
        """The stall deadline around one request (and reading its body)."""
        try:
            async with StallWatch(self.limits.seconds, self.limits.min_bytes) as watch:
                yield watch
        except Stalled as e:
            raise self.error(f"{what}: registry {self.ref.registry} stalled ({e}; see "
                             f"{STALL_SECONDS_ENV} and {STALL_BYTES_ENV})") from None

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
                raise self.error(_client_error(f"registry {self.ref.registry}", e)) from None
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
        realm = params["realm"]
        try:
            async with self.session.get(realm, params=query, auth=auth) as r:
                if r.status >= 400:
                    raise self.error(f"token server {realm}: HTTP {r.status} "
                                     f"{r.reason}{await _error_detail(r)}")
                data = await _read_capped(r, MAX_TOKEN_RESPONSE)
        except aiohttp.ClientError as e:
            raise self.error(f"token server {realm}: "
                             f"{_client_error('it', e)}") from None
        if data is None:
            raise self.error(f"token server {realm}: answer over "
                             f"{MAX_TOKEN_RESPONSE} bytes; refused")
        try:
            body = layout.load_json(data, "token server answer")
        except layout.LayoutError as e:
            raise self.error(f"token server {realm}: {e}") from None
        token = body.get("token") or body.get("access_token")
        if not token or not isinstance(token, str):
            raise self.error(f"token server {realm} sent no token")
        return token

    async def read_small(self, path: str, what: str, limit: int,
                         headers: dict | None = None) -> bytes:
        """A manifest, index or config: read whole into memory, so refused
        past ``limit`` bytes, by the announced Content-Length before reading
        and by counting while reading (a lying or absent Content-Length)."""
        async with self.watched(what) as watch:
            response = await self.get(path, headers)
            async with response:
                length = response.content_length
                if length is not None and length > limit:
                    raise self.error(f"{what}: the registry announces {length} bytes, "
                                     f"more than the {limit} allowed; refused")
                try:
                    data = await _read_capped(response, limit, watch.add)
                except aiohttp.ClientError as e:
                    problem = _client_error(f"registry {self.ref.registry}", e)
                    raise self.error(f"{what}: {problem}") from None
        if data is None:
            raise self.error(f"{what}: the registry sent more than the {limit} bytes "
                             "allowed; refused")
        return data

    async def manifest(self, reference: str, declared: int | None = None) -> tuple[dict, str]:
        """(manifest or index, its digest), checked when asked by digest.
        ``declared``: its size in the index that points to it."""
        limit = MAX_MANIFEST if declared is None else min(declared, MAX_MANIFEST)
        if declared is not None and declared > MAX_MANIFEST:
            raise self.error(f"manifest {reference}: declared {declared} bytes, more "
                             f"than the {MAX_MANIFEST} allowed; refused")
        data = await self.read_small(f"/manifests/{reference}", f"manifest {reference}",
                                     limit, {"Accept": ACCEPT_MANIFESTS})
        digest = _sha256(data)
        if reference.startswith("sha256:") and digest != reference:
            raise self.error(f"manifest {reference}: digest mismatch (got {digest})")
        try:
            return layout.load_json(data, "manifest"), digest
        except layout.LayoutError as e:
            raise self.error(str(e)) from None

    async def config(self, digest: str, declared: int) -> bytes:
        """The image config: no more than the manifest says it is."""
        if declared > MAX_CONFIG:
            raise self.error(f"config {digest}: declared {declared} bytes, more than "
                             f"the {MAX_CONFIG} allowed; refused")
        data = await self.read_small(f"/blobs/{digest}", f"config {digest}", declared)
        if _sha256(data) != digest:
            raise self.error(f"config {digest}: digest mismatch (got {_sha256(data)})")
        return data

    async def download(self, digest: str, size: int, final: Path,
                       counter: ByteCounter) -> None:
        """Fetch a layer blob into the cache: resume a partial download,
        never hold more than its declared ``size`` on disk, check size and
        digest, and only then give it its final name. A layer that fails a
        check is deleted; one interrupted (network, stall, signal) is kept
        for the next pull to resume."""
        partial = final.with_name(final.name + ".partial")
        f = await _open_locked(partial, final)
        if f is None:  # another pull finished it while we waited
            return
        with f:
            try:
                await self._fill(f, digest, size, counter)
            except BadBlob as e:
                os.unlink(partial)
                raise self.error(f"layer {digest}: {e}") from None
            os.rename(partial, final)

    async def _fill(self, f: BinaryIO, digest: str, size: int,
                    counter: ByteCounter) -> None:
        """Complete the partial file ``f`` (locked) to ``size`` bytes
        matching ``digest``; BadBlob if the registry sends anything else."""
        hasher, have = Sha256Tap(), 0
        if os.fstat(f.fileno()).st_size > size:  # can't be this blob's start
            f.truncate(0)
        while chunk := f.read(CHUNK):
            hasher(chunk)
            have += len(chunk)
        counter.add(have)
        what = f"layer {digest}"
        host = self.ref.registry
        if have < size:
            async with self.watched(what) as watch:
                response = await self.get(f"/blobs/{digest}",
                                          {"Range": f"bytes={have}-"} if have else {})
                async with response:
                    if have and not _resumes_at(response, have):
                        f.seek(0)  # no range support (200): start again
                        f.truncate()
                        counter.add(-have)
                        hasher, have = Sha256Tap(), 0
                    length = response.content_length
                    if length is not None and length != size - have:
                        raise BadBlob(f"registry {host} announces {length} bytes where "
                                      f"the manifest declares {size - have} more")
                    try:
                        have += await _copy_bounded(response, f, size - have, size,
                                                    hasher, (counter.add, watch.add))
                    except aiohttp.ClientError as e:
                        problem = _client_error(f"registry {host}", e)
                        raise self.error(f"{what}: download interrupted ({problem}); "
                                         "pull again to resume") from None
            f.flush()
        if have != size:
            raise BadBlob(f"registry {host} sent {have} of the {size} bytes the "
                          "manifest declares")
        if hasher.digest != digest:
            raise BadBlob(f"digest mismatch (got {hasher.digest})")


class BadBlob(Exception):
    """A blob that is not what its descriptor says (size or digest)."""


async def _open_locked(partial: Path, final: Path) -> BinaryIO | None:
    """``partial`` opened and locked, to be the one downloader of its blob
    even across concurrent pulls; None if ``final`` appeared meanwhile.
    Reopened if it was pruned (unlinked) while we waited for the lock."""
    while True:
        if final.exists():
            return None
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        f = os.fdopen(fd, "r+b")
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(partial)
            except FileNotFoundError:
                current = None
            ours = current and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)
            if final.exists():
                if ours:  # one we created after it was renamed: not needed
                    os.unlink(partial)
                f.close()
                return None
        except BaseException:
            f.close()
            raise
        if ours:
            return f
        f.close()


def _resumes_at(response: aiohttp.ClientResponse, offset: int) -> bool:
    """Whether a ranged response continues exactly at ``offset``."""
    if response.status != 206:
        return False
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)",
                         response.headers.get("Content-Range", "").strip())
    return bool(match) and int(match.group(1)) == offset


async def _copy_bounded(response: aiohttp.ClientResponse, f: BinaryIO, room: int,
                        declared: int, hasher: Sha256Tap, taps: tuple) -> int:
    """Copy the body into ``f``, at most ``room`` bytes: a chunk that would
    go past it is not written, and is a BadBlob. Returns the bytes copied."""
    copied = 0
    while chunk := await response.content.read(CHUNK):
        if copied + len(chunk) > room:
            raise BadBlob(f"{_server(response)} sends more than the {declared} bytes "
                          "the manifest declares (stopped there)")
        f.write(chunk)
        hasher(chunk)
        copied += len(chunk)
        for tap in taps:
            tap(len(chunk))
    return copied


def _server(response: aiohttp.ClientResponse) -> str:
    """Who sent a response: the registry, or where it redirected to (a
    storage service, for blobs)."""
    return f"registry {response.url.host}:{response.url.port}" \
        if not response.history else f"server {response.url.host}:{response.url.port}"


async def _read_capped(response: aiohttp.ClientResponse, limit: int,
                       tap=None) -> bytes | None:
    """The body, or None as soon as it passes ``limit`` bytes (the rest is
    never read)."""
    data = bytearray()
    while chunk := await response.content.read(CHUNK):
        if len(data) + len(chunk) > limit:
            return None
        data += chunk
        if tap is not None:
            tap(len(chunk))
    return bytes(data)


def _client_error(host: str, e: aiohttp.ClientError) -> str:
    """aiohttp's errors in words: some (TooManyRedirects and other
    ClientResponseErrors) print as ``0, message=''``."""
    if isinstance(e, aiohttp.TooManyRedirects):
        where = e.history[-1].headers.get("Location", "") if e.history else ""
        return (f"redirect loop: still redirected after {len(e.history)} redirects"
                + (f" (last to {where[:200]})" if where else ""))
    if isinstance(e, aiohttp.ClientResponseError):
        return f"HTTP {e.status} {e.message}".strip() or type(e).__name__
    if isinstance(e, (aiohttp.ClientConnectorError, aiohttp.ClientOSError)):
        return f"can't reach {host}: {e}"
    text = " ".join(str(e).split())  # one line
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def _error_detail(response: aiohttp.ClientResponse) -> str:
    """The registry's own error message, if it sent one (distribution spec
    ``{"errors": [{"code", "message"}]}``), read no further than a few KiB."""
    try:
        data = await _read_capped(response, MAX_ERROR_BODY)
        error = json.loads(data)["errors"][0]
        text = str(error.get("message") or error.get("code"))
        return f" ({' '.join(text.split())[:200]})"
    except Exception:
        return ""


def _sha256(data: bytes) -> str:
    tap = Sha256Tap()
    tap(data)
    return tap.digest


def _declared_size(descriptor: dict) -> int:
    """A descriptor's ``size``, which bounds what is read for it."""
    size = descriptor.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"descriptor {descriptor.get('digest')}: invalid size {size!r}")
    return size


def prune_partials(dlcache: Path, wanted: set[Path], keep: int = KEEP_PARTIALS) -> None:
    """Delete partial downloads beyond the ``keep`` newest that are not in
    ``wanted`` (this pull's). One another pull is writing (locked) stays."""
    others = [p for p in dlcache.glob("*.partial")
              if p.with_name(p.name.removesuffix(".partial")) not in wanted]
    others.sort(key=_mtime, reverse=True)
    for path in others[keep:]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def cache_path(store: Store, digest: str) -> Path:
    return store.dlcache / layout.check_digest(digest).replace(":", "-")


async def pull_async(text: str, name: str, store: Store, arch: str | None = None,
                     insecure: bool = False, jobs: int = 4,
                     progress: ProgressCallback = no_progress,
                     stall: StallLimit | None = None) -> Path:
    ref = Reference.parse(text)
    stall = stall or StallLimit.from_env()
    progress(Progress("resolve", f"resolving {ref}", 0, None, ""))
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = Client(ref, session, insecure, stall)
        manifest, digest = await client.manifest(ref.reference)
        if manifest.get("mediaType") in layout.INDEX_TYPES or "manifests" in manifest:
            try:
                chosen = layout.pick_platform(manifest, arch, str(ref))
                digest = layout.check_digest(chosen.get("digest"))
            except layout.LayoutError as e:
                raise PullError(str(e)) from None
            try:
                declared = _declared_size(chosen)
            except ValueError as e:
                raise client.error(f"malformed index: {e}") from None
            manifest, digest = await client.manifest(digest, declared)
        try:
            config_descriptor = manifest.get("config") or {}
            config_digest = layout.check_digest(config_descriptor.get("digest"))
            config_size = _declared_size(config_descriptor)
            blobs = [(layout.check_digest(d.get("digest")), _declared_size(d))
                     for d in manifest.get("layers") or []]
        except (layout.LayoutError, TypeError, ValueError, AttributeError) as e:
            raise client.error(f"malformed manifest: {e}") from None
        try:
            config = layout.load_json(await client.config(config_digest, config_size),
                                      "config")
        except layout.LayoutError as e:
            raise client.error(str(e)) from None

        store.dlcache.mkdir(parents=True, exist_ok=True)
        paths = [cache_path(store, d) for d, _ in blobs]
        prune_partials(store.dlcache, set(paths))
        missing = [(d, s, p) for (d, s), p in zip(blobs, paths) if not p.exists()]
        downloads_counter = ByteCounter(
            progress, "download", f"downloading {len(missing)} of {len(blobs)} layers",
            sum(s for _, s, _ in missing))
        semaphore = asyncio.Semaphore(jobs)

        async def fetch(digest: str, size: int, path: Path) -> None:
            async with semaphore:
                await client.download(digest, size, path, downloads_counter)

        tasks = {p: asyncio.create_task(fetch(d, s, p)) for d, s, p in missing}
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
