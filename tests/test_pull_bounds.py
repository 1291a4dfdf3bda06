"""``chspawner pull`` against a hostile registry: every pull is bounded.

The attacker is a stand-in registry (``HostileRegistry``: an aiohttp server
on 127.0.0.1 that this test process runs) serving a small valid image, but
misbehaving on one path: an endless or short layer, a huge manifest or
config, bytes trickled to hold a pull forever, a redirect loop. The pull is
the real ``chspawner pull`` run as the unprivileged test user; each attack
must end in one line on stderr, exit 1, and leave the store as it was.
"""
from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tests.harness.env import AS_USER, CHSPAWNER
from tests.harness.puller import assert_one_line_error
from tests.harness.registry import MEDIA_TYPES, sha256
from tests.harness.users import as_user

MiB = 1 << 20
# Small stall settings for the tests: a pull must see 1 KiB every 2 s.
STALL = {"CHSPAWNER_PULL_STALL_SECONDS": "2", "CHSPAWNER_PULL_STALL_BYTES": "1024"}
PULL_TIMEOUT = 60  # seconds: far past any bound the pulls must keep


@dataclass
class TinyImage:
    """A valid one-layer image: the layer holds 96 KiB of random bytes, so
    it is incompressible and takes a while to trickle."""

    layer: bytes
    config: bytes
    data: bytes
    files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def build(cls) -> TinyImage:
        files = {"hello.txt": b"hello from a hostile registry\n",
                 "data.bin": os.urandom(96 << 10)}
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as t:
            for name, content in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(content), 0o644, 0
                t.addfile(info, io.BytesIO(content))
        layer = gzip.compress(tar.getvalue(), mtime=0)
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar.getvalue())]},
        }).encode()
        return cls(layer, config, files["data.bin"], files)

    @property
    def layer_digest(self) -> str:
        return sha256(self.layer)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    def manifest(self, config_size: int | None = None) -> bytes:
        return json.dumps({
            "schemaVersion": 2, "mediaType": MEDIA_TYPES["oci_manifest"],
            "config": {"mediaType": MEDIA_TYPES["oci_config"],
                       "digest": self.config_digest,
                       "size": len(self.config) if config_size is None else config_size},
            "layers": [{"mediaType": MEDIA_TYPES["oci_layer_gzip"],
                        "digest": self.layer_digest, "size": len(self.layer)}],
        }).encode()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HostileRegistry:
    """A registry serving ``image`` as ``test/<scenario>:1`` for every
    scenario; a scenario replaces the manifest or blob handler with an
    attack. Runs its own event loop in a thread of the test process."""

    def __init__(self, image: TinyImage):
        self.image = image
        self.manifests: dict[str, Handler] = {}
        self.blobs: dict[str, Handler] = {}    # the layer's handler
        self.configs: dict[str, Handler] = {}  # the config's
        self.sent: dict[str, int] = {}  # scenario -> body bytes written
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    # --- lifecycle -----------------------------------------------------------

    def __enter__(self) -> HostileRegistry:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=15)
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self.stopping.set()
            await self.runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=15)

    async def _start(self) -> None:
        self.stopping = asyncio.Event()
        app = web.Application()
        async def version_check(_request: web.Request) -> web.Response:
            return web.json_response({})
        app.router.add_get("/v2/", version_check)
        app.router.add_get(r"/v2/test/{scenario}/manifests/{ref}", self._manifest)
        app.router.add_get(r"/v2/test/{scenario}/blobs/{digest}", self._blob)
        self.runner = web.AppRunner(app, shutdown_timeout=2, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.host = "127.0.0.1:%d" % self.runner.addresses[0][1]

    def ref(self, scenario: str) -> str:
        return f"{self.host}/test/{scenario}:1"

    # --- honest behaviour ----------------------------------------------------

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        handler = self.manifests.get(request.match_info["scenario"])
        if handler:
            return await handler(request)
        return web.Response(body=self.image.manifest(),
                            content_type=MEDIA_TYPES["oci_manifest"])

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        scenario, digest = request.match_info["scenario"], request.match_info["digest"]
        handler = {self.image.layer_digest: self.blobs,
                   self.image.config_digest: self.configs}.get(digest, {}).get(scenario)
        if handler:
            return await handler(request)
        blobs = {self.image.layer_digest: self.image.layer,
                 self.image.config_digest: self.image.config}
        data = blobs.get(request.match_info["digest"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="application/octet-stream")

    # --- attacks -------------------------------------------------------------

    async def stream(self, request: web.Request, chunks, length: int | None = None,
                     pause: float = 0.0) -> web.StreamResponse:
        """Send ``chunks`` (an iterable of bytes) as the body, ``pause``
        seconds apart, announcing ``length`` (None: chunked), until they
        run out, the client hangs up or the registry stops."""
        scenario = request.match_info["scenario"]
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if length is None:
            response.enable_chunked_encoding()
        else:
            response.content_length = length
        await response.prepare(request)
        try:
            for chunk in chunks:
                await response.write(chunk)
                self.sent[scenario] = self.sent.get(scenario, 0) + len(chunk)
                if pause and not await self._pause(pause):
                    break
        except ConnectionError:  # the client gave up: what the test wants
            pass
        return response

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` (the attack's pace); False if stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return False
        except asyncio.TimeoutError:
            return True

    async def silent(self, request: web.Request) -> web.StreamResponse:
        """Accept the request and never answer."""
        await self.stopping.wait()
        return web.Response(status=503)


def endless(prefix: bytes = b""):
    yield prefix
    zeros = bytes(MiB)
    while True:
        yield zeros


def trickle(data: bytes):
    for i in range(len(data)):
        yield data[i:i + 1]


@pytest.fixture(scope="module")
def image() -> TinyImage:
    return TinyImage.build()


@pytest.fixture
def hostile(image):
    with HostileRegistry(image) as reg:
        yield reg


def pull(puller, ref: str, *, env: dict[str, str] | None = None, options: list[str] = (),
         wrap: list[str] = (), timeout: float = PULL_TIMEOUT) -> subprocess.CompletedProcess:
    """``chspawner pull REF x`` as the test user, under ``wrap`` (prlimit,
    an RSS meter), timed (``.elapsed``)."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    argv = [str(AS_USER), puller.user.pw_name, *wrap, "env", *extra, str(CHSPAWNER),
            "pull", "-q", "--insecure", "-s", str(puller.store), *options, ref, "x"]
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    result.elapsed = time.monotonic() - start
    return result


def store_files(puller) -> dict[str, int]:
    """Every file in the store, with its size."""
    return {str(p.relative_to(puller.store)): p.stat().st_size
            for p in puller.store.rglob("*") if p.is_file()}


def assert_refused(result, puller, *words, partial_within: int | None = None):
    """One line, exit 1, no image, and nothing in the store; except, with
    ``partial_within``, a partial layer download (for a later pull to
    resume) of at most that many bytes."""
    assert_one_line_error(result, *words)
    assert not puller.image("x").exists() and puller.clean()
    files = store_files(puller)
    if partial_within is not None:
        files = {p: n for p, n in files.items()
                 if not (p.endswith(".partial") and n <= partial_within)}
    assert not files, files


# ---------------------------------------------------------------- layers ----

def test_endless_layer_stops_at_its_declared_size(puller, hostile, image):
    """The layer's bytes, then zeros forever: refused, and no file ever
    grows past the declared size (RLIMIT_FSIZE makes a longer write fail,
    which would not give this error), and nothing is kept."""
    hostile.blobs["endless"] = lambda r: hostile.stream(r, endless(image.layer))
    size = len(image.layer)
    result = pull(puller, hostile.ref("endless"), wrap=["prlimit", f"--fsize={size}"])
    assert_refused(result, puller, image.layer_digest, hostile.host, "more than")
    assert result.elapsed < 30


@pytest.mark.parametrize("announced", [True, False])
def test_short_layer_is_refused_and_deleted(puller, hostile, image, announced):
    """Half the layer and a clean end: with its true Content-Length, refused
    before reading; chunked, refused at the end. Nothing kept."""
    half = image.layer[:len(image.layer) // 2]
    hostile.blobs["short"] = lambda r: hostile.stream(
        r, [half], length=len(half) if announced else None)
    result = pull(puller, hostile.ref("short"))
    words = ((f"announces {len(half)} bytes", f"declares {len(image.layer)}")
             if announced else (f"{len(half)} of the {len(image.layer)} bytes",))
    assert_refused(result, puller, image.layer_digest, hostile.host, *words)


def test_layer_with_wrong_content_is_deleted(puller, hostile, image):
    bad = bytes(len(image.layer))
    hostile.blobs["wrong"] = lambda r: hostile.stream(r, [bad], length=len(bad))
    assert_refused(pull(puller, hostile.ref("wrong")), puller, image.layer_digest,
                   "digest mismatch")


# ------------------------------------------------- manifests and configs ----

RSS_METER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(r.returncode)")


def peak_rss_kib(result) -> int:
    return int(result.stdout.split()[-1])


HUGE = 200 * MiB


@pytest.mark.parametrize("attack", ["manifest-announced", "manifest-chunked",
                                    "config-declared", "config-served"])
def test_huge_manifest_or_config_is_never_read_whole(puller, hostile, image, attack):
    """200 MiB where a few KiB belong: refused while the pull's peak memory
    stays that of a pull refused at once (a 404)."""
    huge = (b"\x20" * MiB for _ in range(HUGE // MiB))
    if attack == "manifest-announced":
        hostile.manifests[attack] = lambda r: hostile.stream(r, huge, length=HUGE)
    elif attack == "manifest-chunked":
        hostile.manifests[attack] = lambda r: hostile.stream(r, huge)
    elif attack == "config-declared":
        manifest = image.manifest(config_size=HUGE)
        hostile.manifests[attack] = lambda r: hostile.stream(r, [manifest],
                                                             length=len(manifest))
    else:  # the declared size, but a body without end
        hostile.configs[attack] = lambda r: hostile.stream(r, huge)
    meter = ["/usr/bin/python3", "-c", RSS_METER]
    baseline = pull(puller, f"{hostile.host}/nothere/x:1", wrap=meter)
    assert_one_line_error(baseline, "404")
    result = pull(puller, hostile.ref(attack), wrap=meter)
    what = "manifest" if attack.startswith("manifest") else "config"
    assert_refused(result, puller, what, "allowed; refused")
    growth = peak_rss_kib(result) - peak_rss_kib(baseline)
    print(f"{attack}: peak RSS {peak_rss_kib(result)} KiB, "
          f"{growth} KiB over a refused pull")
    assert growth < 32 * 1024, f"peak RSS grew {growth} KiB"
    assert hostile.sent.get(attack, 0) < 64 * MiB  # the rest was never asked for


# ------------------------------------------------------------- stalling ----

@pytest.mark.parametrize("where", ["silent", "manifest", "config", "layer"])
def test_trickling_registry_hits_the_stall_deadline(puller, hostile, image, where):
    """A byte every 0.2 s keeps a socket alive forever; with the deadline
    at 1 KiB per 2 s the pull fails within about 2 s of the stall."""
    if where == "silent":
        hostile.manifests[where] = hostile.silent
    elif where == "manifest":
        manifest = image.manifest()
        hostile.manifests[where] = lambda r: hostile.stream(
            r, trickle(manifest), length=len(manifest), pause=0.2)
    elif where == "config":
        hostile.configs[where] = lambda r: hostile.stream(
            r, trickle(image.config), length=len(image.config), pause=0.2)
    else:  # half the layer at once (progress), then a trickle
        half = len(image.layer) // 2
        chunks = [image.layer[:half], *trickle(image.layer[half:])]
        hostile.blobs[where] = lambda r: hostile.stream(
            r, chunks, length=len(image.layer), pause=0.2)
    result = pull(puller, hostile.ref(where), env=STALL)
    # Kept for a later pull to resume: the partial layer, within its size.
    assert_refused(result, puller, "stalled", hostile.host,
                   partial_within=len(image.layer) if where == "layer" else None)
    print(f"{where}: refused after {result.elapsed:.1f} s")
    assert result.elapsed < 2 + 8  # the deadline, and process start-up


def test_slow_but_steady_registry_succeeds(puller, hostile, image):
    """4 KiB every 0.1 s: the whole layer takes longer than the stall
    window, but every window sees its 1 KiB, so the pull goes through."""
    chunks = [image.layer[i:i + 4096] for i in range(0, len(image.layer), 4096)]
    hostile.blobs["steady"] = lambda r: hostile.stream(
        r, chunks, length=len(image.layer), pause=0.1)
    result = pull(puller, hostile.ref("steady"), env=STALL)
    assert result.returncode == 0, result.stderr
    assert result.elapsed > 2  # longer than one stall window
    assert (puller.image("x") / "data.bin").read_bytes() == image.data


def test_stall_options_override_the_environment(puller, hostile):
    """--stall-seconds/--stall-bytes win over the variables (here a
    deadline of 10 minutes, which would outlast the test)."""
    hostile.manifests["silent"] = hostile.silent
    result = pull(puller, hostile.ref("silent"),
                  env={"CHSPAWNER_PULL_STALL_SECONDS": "600"},
                  options=["--stall-seconds=2", "--stall-bytes=1024"])
    assert_refused(result, puller, "stalled", hostile.host)
    assert result.elapsed < 2 + 8
    bad = pull(puller, hostile.ref("silent"), options=["--stall-bytes=0"])
    assert bad.returncode == 64 and "--stall-bytes" in bad.stderr, bad.stderr


def test_bad_stall_setting_is_one_line(puller, hostile):
    result = pull(puller, hostile.ref("any"),
                  env={"CHSPAWNER_PULL_STALL_SECONDS": "soon"})
    assert_refused(result, puller, "CHSPAWNER_PULL_STALL_SECONDS", "'soon'")


# ------------------------------------------------------------- redirects ----

def test_redirect_loop_is_named(puller, hostile):
    async def loop(request):
        raise web.HTTPFound(location=request.path)
    hostile.manifests["loop"] = loop
    result = pull(puller, hostile.ref("loop"))
    assert_refused(result, puller, "redirect loop", hostile.host)
    assert "message=''" not in result.stderr


# -------------------------------------------------------------- partials ----

def test_partials_are_bounded(puller, hostile, image):
    """Partial downloads of other pulls: the 4 newest are kept for resume,
    older ones deleted; the pull's own layer is downloaded whole."""
    dlcache = puller.store / "dlcache"
    as_user(puller.user.pw_name, "mkdir", str(dlcache))
    now = time.time()
    for i in range(7):
        path = dlcache / f"sha256-{i:064x}.partial"
        as_user(puller.user.pw_name, "sh", "-c", f"head -c 1000 /dev/zero > {path}")
        os.utime(path, (now - i * 60, now - i * 60))
    result = pull(puller, hostile.ref("good"))
    assert result.returncode == 0, result.stderr
    left = sorted(p.name for p in dlcache.glob("*.partial"))
    assert left == [f"sha256-{i:064x}.partial" for i in range(4)]
    assert (dlcache / image.layer_digest.replace(":", "-")).stat().st_size \
        == len(image.layer)


def test_concurrent_pulls_download_a_layer_once(puller, hostile, image):
    """Two pulls of one slow layer into one store: one downloads, the other
    waits for it; both succeed and no partial is left behind."""
    chunks = [image.layer[i:i + 8192] for i in range(0, len(image.layer), 8192)]
    hostile.blobs["shared"] = lambda r: hostile.stream(
        r, chunks, length=len(image.layer), pause=0.1)
    argv = [str(AS_USER), puller.user.pw_name, str(CHSPAWNER), "pull", "-q",
            "--insecure", "-s", str(puller.store), hostile.ref("shared")]
    first, second = (subprocess.Popen([*argv, name], stderr=subprocess.PIPE, text=True)
                     for name in ("a", "b"))
    for proc in (first, second):
        assert proc.wait(timeout=PULL_TIMEOUT) == 0, proc.stderr.read()
        proc.stderr.close()
    assert hostile.sent["shared"] == len(image.layer)
    assert not list((puller.store / "dlcache").glob("*.partial"))
    for name in ("a", "b"):
        assert (puller.image(name) / "data.bin").read_bytes() == image.data


# ------------------------------------------------------------ the watch ----

@pytest.mark.unit
def test_stall_watch_counts_windows_not_totals():
    """Steady progress passes however long it lasts; a window without
    ``min_bytes`` cancels the work and raises Stalled."""
    from chspawner.images.progress import Stalled, StallWatch

    async def work(rate_bytes: int, steps: int) -> None:
        async with StallWatch(0.2, 100) as watch:
            for _ in range(steps):
                await asyncio.sleep(0.05)  # the pace of the transfer itself
                watch.add(rate_bytes)

    start = time.monotonic()
    asyncio.run(work(50, 20))  # 100 bytes per 0.1 s for 1 s: passes
    assert time.monotonic() - start >= 1.0
    start = time.monotonic()
    with pytest.raises(Stalled):
        asyncio.run(work(1, 1000))  # 20 bytes/s: stopped after one window
    assert time.monotonic() - start < 0.2 + 0.5
