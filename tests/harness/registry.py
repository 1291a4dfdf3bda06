"""Real OCI registries on 127.0.0.1, filled with test images the tests build.

Everything here is a real program speaking the real protocol: Debian's
``docker-registry`` (distribution 2.8) serves, ``umoci`` builds the images,
``skopeo`` pushes and exports them, and ``TokenServer`` is a small but real
Docker bearer-token server.  Nothing is mocked, so a pull client that passes
against this harness speaks the protocol the way registries do.

Used from pytest through the session fixtures at the bottom (``registry``,
``basic_registry``, ``token_registry``, ``test_images``), which
tests/conftest.py imports, or directly (bench/images.py, scripts/demo.py)::

    images = build_images(workdir, busybox_rootfs)
    with TokenServer(anonymous_pull=True) as tokens, \
            Registry(auth="token", token_server=tokens) as reg:
        push(images.one, reg)     # as reg.user, through the token flow

Must run as root (pytest does): ``umoci unpack`` without ``--rootless`` keeps
the layers' root ownership.
"""
from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.harness import procs
from tests.harness.net import free_port
from tests.harness.text import tail

__all__ = [
    "Registry", "TokenServer", "TokenRequest", "Image", "PlatformImage",
    "ImageSet", "build_images", "push", "push_images", "export_oci_layout",
    "export_oci_archive", "export_docker_archive", "MEDIA_TYPES", "ACCEPT_ALL",
    "DIRECT", "Layout", "skopeo", "sha256",
    "registry", "basic_registry", "token_registry", "test_images",
]

START_TIMEOUT = 15.0   # seconds a server gets to answer its first request
TOOL_TIMEOUT = 120.0   # seconds for one umoci/skopeo/htpasswd run

MEDIA_TYPES = {
    "oci_manifest": "application/vnd.oci.image.manifest.v1+json",
    "oci_index": "application/vnd.oci.image.index.v1+json",
    "oci_config": "application/vnd.oci.image.config.v1+json",
    "oci_layer_gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "docker_manifest": "application/vnd.docker.distribution.manifest.v2+json",
    "docker_list": "application/vnd.docker.distribution.manifest.list.v2+json",
}
# What a modern client sends: without the OCI types in Accept, distribution
# 2.8 answers 404 for an OCI index and would down-convert other manifests.
ACCEPT_ALL = ", ".join(MEDIA_TYPES[k] for k in (
    "oci_index", "oci_manifest", "docker_list", "docker_manifest"))
REF_NAME = "org.opencontainers.image.ref.name"


# --- small process helpers -------------------------------------------------

def _log_summary(text: str) -> str:
    """The line of a docker-registry log that says why it stopped: a Go
    panic's message or the last fatal/error entry (the tail of a panic is
    only its stack trace), else the log's tail."""
    lines = text.strip().splitlines()
    for marker in ("panic: ", "level=fatal", "level=error"):
        hits = [line.strip() for line in lines if marker in line]
        if hits:
            return hits[-1]
    return tail(text)


def _tool(*argv: str, env: Mapping[str, str] | None = None) -> str:
    """Run a command-line tool; fail in one line with its stderr's tail."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True,
                                timeout=TOOL_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{argv[0]} timed out after {TOOL_TIMEOUT:.0f} s: "
                           f"{' '.join(argv)}") from None
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{tail(result.stderr or result.stdout)}")
    return result.stdout


# Loopback servers only: never through a proxy from http_proxy & co.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of GET url, or None while nothing accepts connections."""
    try:
        with DIRECT.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the token server ------------------------------------------------------

@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered, for tests to assert on."""
    method: str
    path: str
    params: Mapping[str, list[str]]  # query (GET) or form (POST) fields
    credentials: bool                # a user and password were sent
    user: str | None                 # the user it names, right or wrong
    status: int
    granted: list[dict] = field(default_factory=list)  # the token's "access"

    @property
    def scopes(self) -> list[str]:
        scopes = self.params.get("scope", [])
        # OAuth2 POSTs put several scopes in one space-separated field.
        return [s for value in scopes for s in value.split()]


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:test/one:pull,push`` -> (type, name, actions)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


def _libtrust_key_id(public_key: Any) -> str:
    """The key id docker's libtrust gives a key: SHA-256 of the DER public
    key, 240 bits, base32, in colon-separated groups of four."""
    from cryptography.hazmat.primitives import serialization
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


class TokenServer:
    """A Docker token server (the "realm" of a registry's Bearer challenge).

    ``GET /token?service=S&scope=repository:NAME:pull,push`` with HTTP Basic
    credentials answers ``{"token", "access_token", "expires_in",
    "issued_at"}``; the token is an RS256 JWT whose header carries the
    signing certificate as ``x5c`` (what distribution 2.8 checks against its
    ``rootcertbundle``) and ``kid`` (libtrust form).  Known users get every
    action they ask for; no credentials get 401, or pull-only tokens when
    ``anonymous_pull``; wrong credentials always get 401.  The OAuth2 form
    (POST /token, grant_type=password) is accepted too.  Every request is
    kept in ``requests``.
    """

    def __init__(self, users: Mapping[str, str] | None = None, *,
                 anonymous_pull: bool = False,
                 service: str = "chspawner-test-registry",
                 issuer: str = "chspawner-test-token-server",
                 expires_in: int = 300, workdir: Path | None = None):
        self.users = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="chspawner-tokens-"))
        self.cert_path = self.workdir / "token-root.pem"
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key, self._cert_der = self._make_key_and_cert()

    # Key material: one self-signed certificate that is both the JWT's x5c
    # chain and the registry's whole rootcertbundle.  (cryptography and jwt
    # are imported where used, so a conftest importing this module doesn't
    # need them until a token server is made.)
    def _make_key_and_cert(self) -> tuple[Any, bytes]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                               critical=True)
                .sign(key, hashes.SHA256()))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert.public_bytes(serialization.Encoding.DER)

    @property
    def public_key(self) -> Any:
        """For tests that decode tokens: ``jwt.decode(t, ts.public_key, ...)``."""
        return self._key.public_key()

    @property
    def url(self) -> str:
        assert self._server is not None, "TokenServer not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def add_user(self, user: str, password: str) -> None:
        self.users[user] = password

    def start(self) -> TokenServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the protocol ---

    def issue(self, subject: str, access: list[dict]) -> str:
        """A signed token for ``subject`` granting ``access``."""
        import jwt
        now = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service,
            "exp": now + self.expires_in, "nbf": now - 10, "iat": now,
            "jti": uuid.uuid4().hex, "access": access,
        }
        headers = {"x5c": [base64.b64encode(self._cert_der).decode()],
                   "kid": _libtrust_key_id(self._key.public_key())}
        return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)

    def _grant(self, scopes: list[str], anonymous: bool) -> list[dict]:
        access = []
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            kind, name, actions = parsed
            if anonymous:
                actions = [a for a in actions if a == "pull"]
            if actions:
                access.append({"type": kind, "name": name, "actions": actions})
        return access

    def _answer(self, method: str, path: str, params: dict[str, list[str]],
                authorization: str | None) -> tuple[int, dict, TokenRequest]:
        user, password = None, None
        if authorization and authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:]).decode()
                user, _, password = decoded.partition(":")
            except ValueError:
                user = ""
        if method == "POST":  # OAuth2 password grant carries its own creds
            user = params.get("username", [user])[0]
            password = params.get("password", [password])[0]
        credentials = user is not None
        scopes = [s for v in params.get("scope", []) for s in v.split()]

        def record(status: int, granted: list[dict]) -> TokenRequest:
            return TokenRequest(method, path, params, credentials, user, status, granted)

        if path != "/token":
            return 404, {"errors": [{"code": "NOT_FOUND"}]}, record(404, [])
        if params.get("service", [self.service])[0] != self.service:
            return 400, {"errors": [{"code": "BAD_SERVICE"}]}, record(400, [])
        if user is None and not self.anonymous_pull:
            return 401, {"errors": [{"code": "UNAUTHORIZED"}]}, record(401, [])
        if user is not None and self.users.get(user) != password:
            return 401, {"errors": [{"code": "DENIED"}]}, record(401, [])
        granted = self._grant(scopes, anonymous=user is None)
        token = self.issue(user or "", granted)
        body = {"token": token, "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": datetime.datetime.now(datetime.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ")}
        return 200, body, record(200, granted)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method: str, params: dict[str, list[str]]) -> None:
                path = urllib.parse.urlsplit(self.path).path
                status, body, request = server._answer(
                    method, path, params, self.headers.get("Authorization"))
                with server._lock:
                    server._requests.append(request)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate",
                                     f'Basic realm="{server.issuer}"')
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._reply("GET", urllib.parse.parse_qs(
                    urllib.parse.urlsplit(self.path).query))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = self.rfile.read(length).decode()
                self._reply("POST", urllib.parse.parse_qs(form))

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are recorded, not printed into test output

        return Handler


# --- the registry ----------------------------------------------------------

# Shared by every Registry so two processes can serve one storage dir: the
# secret signs upload state, and a random one per process breaks resumption.
HTTP_SECRET = "chspawner-test-registry-secret"


class Registry:
    """docker-registry on 127.0.0.1:<free port>, with its own config.

    ``auth``: None (anonymous), "basic" (htpasswd, bcrypt) or "token"
    (Bearer tokens from ``token_server``; one is made and owned if none is
    given).  ``storage`` shares another Registry's storage dir (then it is
    not deleted here); by default storage lives in ``workdir`` and goes
    on ``stop()``.
    """

    def __init__(self, workdir: Path | None = None, *,
                 auth: Literal["basic", "token"] | None = None,
                 token_server: TokenServer | None = None,
                 storage: Path | None = None,
                 user: str = "chspawner-tester", password: str | None = None):
        if auth not in (None, "basic", "token"):
            raise ValueError(f"auth must be None, 'basic' or 'token', not {auth!r}")
        self.auth = auth
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="chspawner-registry-"))
        self._own_storage = storage is None
        self.storage = Path(storage or self.workdir / "storage")
        self.user = user if auth else None
        self.password = (password or "pw-" + secrets.token_hex(8)) if auth else None
        self._own_token_server = auth == "token" and token_server is None
        self.token_server = token_server
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        assert self.port is not None, "Registry not started"
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def creds(self) -> str | None:
        """``user:password`` as skopeo's --creds wants it; None if anonymous."""
        return f"{self.user}:{self.password}" if self.auth else None

    def ref(self, repo_tag: str) -> str:
        """``test/one:1`` -> ``127.0.0.1:PORT/test/one:1``."""
        return f"{self.host}/{repo_tag}"

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _auth_config(self) -> dict:
        if self.auth == "basic":
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(_tool("htpasswd", "-Bbn", self.user, self.password))
            return {"htpasswd": {"realm": "chspawner-test", "path": str(htpasswd)}}
        if self.auth == "token":
            return {"token": {"realm": self.token_server.realm,
                              "service": self.token_server.service,
                              "issuer": self.token_server.issuer,
                              "rootcertbundle": str(self.token_server.cert_path)}}
        return {}

    def _write_config(self) -> None:
        # JSON is YAML, and it quotes paths and realms without surprises.
        config = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True},
                        # No background purge scanning a shared dir twice.
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.host, "secret": HTTP_SECRET},
        }
        auth = self._auth_config()
        if auth:
            config["auth"] = auth
        self.config_path.write_text(json.dumps(config, indent=1))

    def start(self) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        if self.auth == "token":
            if self.token_server is None:
                self.token_server = TokenServer(workdir=self.workdir / "tokens")
            if self._own_token_server:
                self.token_server.start()
            self.token_server.add_user(self.user, self.password)
        try:
            # Another process may grab the port between free_port and bind;
            # that shows as "address already in use", and a new port cures it.
            for _ in range(3):
                self.port = free_port()
                self._write_config()
                try:
                    self._spawn_and_wait()
                    return self
                except _PortClash:
                    continue
            raise RuntimeError(f"docker-registry: no free port after 3 tries; "
                               f"log: {_log_summary(self.log())}")
        except BaseException:
            self.stop()  # __exit__ won't run when __enter__ raises
            raise

    def _spawn_and_wait(self) -> None:
        with open(self.log_path, "wb") as log:
            # A clean environment: docker-registry lets REGISTRY_* variables
            # override the config file, and the host's must not leak in.
            self.process = subprocess.Popen(
                ["docker-registry", "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            # Any HTTP answer to /v2/ (200, or 401 when auth is on) is ready.
            if _http_status(self.url + "/v2/", timeout=0.5) is not None:
                return
            try:
                # Waits a little between polls, and notices an early exit.
                self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    self._kill()
                    raise RuntimeError(
                        f"docker-registry on {self.host} not ready after "
                        f"{START_TIMEOUT:.0f} s; log: {_log_summary(self.log())}"
                    ) from None
                continue
            if "address already in use" in self.log():
                raise _PortClash()
            raise RuntimeError(
                f"docker-registry on {self.host} exited {self.process.returncode} "
                f"at start; log: {_log_summary(self.log())}")

    def _kill(self) -> None:
        if self.process is not None:
            procs.stop(self.process, timeout=5)

    def stop(self) -> None:
        self._kill()
        self.process = None
        if self._own_token_server and self.token_server is not None:
            self.token_server.stop()
        if self._own_storage:
            shutil.rmtree(self.storage, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        """The registry's log so far (access log included), for debugging."""
        return self.log_path.read_text() if self.log_path.exists() else ""


class _PortClash(Exception):
    pass


# --- what the test images are ----------------------------------------------

@dataclass(frozen=True)
class PlatformImage:
    """One platform's image inside a manifest list / OCI index."""
    platform: str                # "linux/arm64"
    digest: str                  # its manifest's digest
    files: Mapping[str, str]     # path in its rootfs -> expected content


@dataclass(frozen=True)
class Image:
    """An image the harness built and can push: what a test should see.

    ``source`` is skopeo's reference to the built image; ``digest`` and
    ``media_type`` are the top-level manifest's as a registry stores them
    (skopeo pushes them unchanged).  ``files``/``absent`` describe the
    flattened rootfs; ``whiteouts`` maps each whiteout member of the *last*
    layer's tar to "file" or "opaque".  ``config`` is the expected subset
    of the image config's "config" object.  For an index, ``platforms``
    lists the platform images, ``files`` is the linux/amd64 one's and
    ``layers`` counts each platform image's layers.
    """
    name: str
    repo: str
    tag: str
    source: str
    media_type: str
    digest: str
    layers: int
    files: Mapping[str, str]
    absent: tuple[str, ...] = ()
    whiteouts: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    cmd_output: str | None = None     # stdout of running it with no command
    platforms: Mapping[str, PlatformImage] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.tag}"

    def at(self, registry: Registry) -> str:
        """Where it lives on ``registry``: ``127.0.0.1:PORT/test/one:1``."""
        return registry.ref(self.ref)

    @property
    def is_index(self) -> bool:
        return bool(self.platforms)

    @property
    def whiteout_kinds(self) -> frozenset[str]:
        return frozenset(self.whiteouts.values())


@dataclass(frozen=True)
class ImageSet:
    """Every image the harness builds, all from one OCI layout."""
    layout: Path
    one: Image             # test/one:1, OCI, one layer
    one_v2s2: Image        # test/one-v2s2:1, the same as Docker v2 schema 2
    multi: Image           # test/multi:1, 3 layers, file + opaque whiteouts
    multi_perfile: Image   # test/multi:perfile, umoci's own per-file whiteouts
    multiarch: Image       # test/multiarch:1, OCI index amd64 + arm64
    multiarch_v2s2: Image  # test/multiarch:v2s2, Docker manifest list

    def all(self) -> tuple[Image, ...]:
        return (self.one, self.one_v2s2, self.multi, self.multi_perfile,
                self.multiarch, self.multiarch_v2s2)


# --- building images with umoci ---------------------------------------------

class Layout:
    """One OCI image layout that umoci builds into, plus the by-hand edits
    umoci can't make (an index, a rewritten layer)."""

    def __init__(self, workdir: Path, base_rootfs: Path):
        self.workdir = workdir
        self.path = workdir / "oci"
        self.base_rootfs = base_rootfs
        _tool("umoci", "init", "--layout", str(self.path))
        _tool("umoci", "new", "--image", f"{self.path}:empty")

    def image(self, tag: str) -> str:
        return f"{self.path}:{tag}"

    @contextmanager
    def edit(self, src: str, dst: str) -> Iterator[Path]:
        """Unpack tag ``src``, let the caller change the rootfs it yields,
        repack the difference as one new layer under tag ``dst``."""
        bundle = self.workdir / f"bundle-{dst}"
        _tool("umoci", "unpack", "--image", self.image(src), str(bundle))
        try:
            yield bundle / "rootfs"
            _tool("umoci", "repack", "--image", self.image(dst), str(bundle))
        finally:
            shutil.rmtree(bundle, ignore_errors=True)

    def add_base(self, rootfs: Path) -> None:
        """Copy (never touch) the cached busybox rootfs into a bundle."""
        _tool("cp", "-a", f"{self.base_rootfs}/.", f"{rootfs}/")

    def config(self, tag: str, *options: str) -> None:
        _tool("umoci", "config", "--image", self.image(tag), *options)

    # JSON-level access to the layout.

    def _index(self) -> dict:
        return json.loads((self.path / "index.json").read_text())

    def descriptor(self, tag: str) -> dict:
        for entry in self._index()["manifests"]:
            if entry.get("annotations", {}).get(REF_NAME) == tag:
                return entry
        raise KeyError(f"no tag {tag} in {self.path}")

    def blob(self, digest: str) -> bytes:
        return (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    def json_blob(self, digest: str) -> dict:
        return json.loads(self.blob(digest))

    def put_blob(self, data: bytes, media_type: str) -> dict:
        digest = sha256(data)
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def set_tag(self, tag: str, descriptor: dict) -> None:
        index = self._index()
        index["manifests"] = [m for m in index["manifests"]
                              if m.get("annotations", {}).get(REF_NAME) != tag]
        index["manifests"].append({**descriptor, "annotations": {REF_NAME: tag}})
        (self.path / "index.json").write_text(json.dumps(index))

    def manifest(self, tag: str) -> dict:
        return self.json_blob(self.descriptor(tag)["digest"])

    def layer_members(self, tag: str, layer: int = -1) -> list[tarfile.TarInfo]:
        data = self.blob(self.manifest(tag)["layers"][layer]["digest"])
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
            return tar.getmembers()

    def replace_last_layer(self, tag: str, new_tag: str, layer_tar: bytes) -> None:
        """Swap the last layer of ``tag`` for ``layer_tar``, fixing the
        digests the chain hangs on: layer descriptor, config diff_ids,
        config descriptor, manifest, index entry."""
        manifest = self.manifest(tag)
        config = self.json_blob(manifest["config"]["digest"])
        config["rootfs"]["diff_ids"][-1] = sha256(layer_tar)
        manifest["layers"][-1] = self.put_blob(
            gzip.compress(layer_tar, mtime=0), MEDIA_TYPES["oci_layer_gzip"])
        manifest["config"] = self.put_blob(json.dumps(config).encode(),
                                           MEDIA_TYPES["oci_config"])
        self.set_tag(new_tag, self.put_blob(json.dumps(manifest).encode(),
                                            MEDIA_TYPES["oci_manifest"]))


def _whiteouts(members: Iterable[tarfile.TarInfo]) -> dict[str, str]:
    found = {}
    for member in members:
        base = os.path.basename(member.name)
        if base == ".wh..wh..opq":
            found[member.name] = "opaque"
        elif base.startswith(".wh."):
            found[member.name] = "file"
    return found


def _make_opaque(layer: bytes, directory: str) -> bytes:
    """Rewrite a layer tar so ``directory`` is replaced by an opaque
    whiteout instead of one ``.wh.NAME`` per deleted entry.

    umoci 0.4.7 never writes ``.wh..wh..opq``; docker/buildkit do when a
    directory is replaced.  As docker writes it, the directory's own entry
    comes first (umoci leaves it out when only its contents changed, so it
    is added then), the marker right after it, then the new contents (an
    extractor must not let the marker hide entries of its own layer).
    """
    src = tarfile.open(fileobj=io.BytesIO(layer))
    out = io.BytesIO()
    inserted = False

    def opaque_dir(dir_entry: tarfile.TarInfo | None, mtime: float) -> None:
        if dir_entry is None:
            dir_entry = tarfile.TarInfo(directory)
            dir_entry.type, dir_entry.mode, dir_entry.mtime = tarfile.DIRTYPE, 0o755, mtime
        dst.addfile(dir_entry)
        marker = tarfile.TarInfo(f"{directory}/.wh..wh..opq")
        marker.mode, marker.mtime = 0o644, mtime
        dst.addfile(marker, io.BytesIO())

    # tarfile.close() writes the two zero blocks that end a proper archive.
    with src, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            name = member.name.removeprefix("./").rstrip("/")
            parent, base = os.path.split(name)
            if parent == directory and base.startswith(".wh."):
                continue  # subsumed by the opaque marker
            inside = f"{parent}/".startswith(f"{directory}/")
            if not inserted and (name == directory or inside):
                opaque_dir(member if name == directory else None, member.mtime)
                inserted = True
                if name == directory:
                    continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        if not inserted:  # the directory was emptied: nothing new inside it
            opaque_dir(None, 0)
    return out.getvalue()


def _layout_image(layout: Layout, name: str, repo: str, tag: str,
                  layout_tag: str, **details: Any) -> Image:
    desc = layout.descriptor(layout_tag)
    layers = details.pop("layers", None)
    if layers is None:
        layers = len(layout.json_blob(desc["digest"])["layers"])
    return Image(name=name, repo=repo, tag=tag,
                 source=f"oci:{layout.image(layout_tag)}",
                 media_type=desc["mediaType"], digest=desc["digest"],
                 layers=layers, **details)


def _as_v2s2(image: Image, name: str, repo: str, tag: str,
             workdir: Path) -> Image:
    """A Docker v2 schema 2 copy of ``image`` in a ``dir:`` (skopeo converts
    once here, so the pushed digest is known before any push)."""
    target = workdir / f"dir-{name}"
    args = ["--all"] if image.is_index else []
    skopeo("copy", *args, "--format", "v2s2", image.source, f"dir:{target}")
    manifest = (target / "manifest.json").read_bytes()
    media_type = json.loads(manifest)["mediaType"]
    platforms = {}
    if image.is_index:
        for entry in json.loads(manifest)["manifests"]:
            p = entry["platform"]
            key = f"{p['os']}/{p['architecture']}"
            platforms[key] = PlatformImage(key, entry["digest"],
                                           image.platforms[key].files)
    return Image(name=name, repo=repo, tag=tag, source=f"dir:{target}",
                 media_type=media_type, digest=sha256(manifest),
                 layers=image.layers, files=image.files, absent=image.absent,
                 whiteouts=image.whiteouts, config=image.config,
                 cmd_output=image.cmd_output, platforms=platforms)


def _build_one(layout: Layout) -> Image:
    with layout.edit("empty", "one") as rootfs:
        layout.add_base(rootfs)
        (rootfs / "hello.txt").write_text("one layer\n")
    return _layout_image(layout, "one", "test/one", "1", "one",
                         files={"/hello.txt": "one layer\n"})


MULTI_ENV = ("PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello")


def _build_multi(layout: Layout) -> tuple[Image, Image]:
    """Three layers: base + /data; add and change; delete and replace."""
    with layout.edit("empty", "multi-1") as rootfs:
        layout.add_base(rootfs)
        data = rootfs / "data"
        (data / "keep").mkdir(parents=True)
        (data / "keep" / "a.txt").write_text("a\n")
        (data / "opaque").mkdir()
        (data / "opaque" / "old1.txt").write_text("old1\n")
        (data / "opaque" / "old2.txt").write_text("old2\n")
        (data / "gone.txt").write_text("gone\n")
    with layout.edit("multi-1", "multi-2") as rootfs:
        (rootfs / "data" / "new.txt").write_text("new\n")
        (rootfs / "data" / "keep" / "a.txt").write_text("a2\n")
    with layout.edit("multi-2", "multi-perfile") as rootfs:
        (rootfs / "data" / "gone.txt").unlink()
        shutil.rmtree(rootfs / "data" / "opaque")
        (rootfs / "data" / "opaque").mkdir()
        (rootfs / "data" / "opaque" / "fresh.txt").write_text("fresh\n")
    layout.config("multi-perfile",
                  *(f"--config.env={e}" for e in MULTI_ENV),
                  "--config.workingdir=/data",
                  "--config.entrypoint=/bin/sh", "--config.entrypoint=-c",
                  "--config.cmd=echo $GREETING from $(pwd)",
                  "--config.label=org.chspawner.test=multi")
    # Same image, but /data/opaque replaced by an opaque whiteout.
    last = layout.blob(layout.manifest("multi-perfile")["layers"][-1]["digest"])
    layout.replace_last_layer("multi-perfile", "multi",
                              _make_opaque(gzip.decompress(last), "data/opaque"))
    details = dict(
        files={"/data/keep/a.txt": "a2\n", "/data/new.txt": "new\n",
               "/data/opaque/fresh.txt": "fresh\n"},
        absent=("/data/gone.txt", "/data/opaque/old1.txt", "/data/opaque/old2.txt"),
        config={"Env": list(MULTI_ENV), "WorkingDir": "/data",
                "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo $GREETING from $(pwd)"],
                "Labels": {"org.chspawner.test": "multi"}},
        cmd_output="hello from /data\n")
    return (
        _layout_image(layout, "multi", "test/multi", "1", "multi",
                      whiteouts=_whiteouts(layout.layer_members("multi")), **details),
        _layout_image(layout, "multi_perfile", "test/multi", "perfile", "multi-perfile",
                      whiteouts=_whiteouts(layout.layer_members("multi-perfile")),
                      **details),
    )


ARCHES = ("amd64", "arm64")


def _build_multiarch(layout: Layout) -> Image:
    """Two images (busybox x86 both: only /arch.txt and the config's
    architecture differ) under one OCI index with their platforms."""
    with layout.edit("empty", "base") as rootfs:
        layout.add_base(rootfs)
    entries, platforms = [], {}
    for arch in ARCHES:
        with layout.edit("base", arch) as rootfs:
            (rootfs / "arch.txt").write_text(f"{arch}\n")
        layout.config(arch, f"--architecture={arch}", "--os=linux")
        desc = {k: v for k, v in layout.descriptor(arch).items() if k != "annotations"}
        entries.append({**desc, "platform": {"architecture": arch, "os": "linux"}})
        platforms[f"linux/{arch}"] = PlatformImage(
            f"linux/{arch}", desc["digest"], {"/arch.txt": f"{arch}\n"})
    index = {"schemaVersion": 2, "mediaType": MEDIA_TYPES["oci_index"],
             "manifests": entries}
    layout.set_tag("multiarch", layout.put_blob(json.dumps(index).encode(),
                                                MEDIA_TYPES["oci_index"]))
    return _layout_image(layout, "multiarch", "test/multiarch", "1", "multiarch",
                         layers=2, files=platforms["linux/amd64"].files,
                         platforms=platforms)


def build_images(workdir: Path, base_rootfs: Path) -> ImageSet:
    """Build every test image into one OCI layout under ``workdir`` (root
    only: umoci keeps root ownership).  ``base_rootfs`` is copied, not
    changed.  Everything is made world-readable, so the unprivileged test
    user can import straight from the layout."""
    layout = Layout(workdir, base_rootfs)
    one = _build_one(layout)
    multi, multi_perfile = _build_multi(layout)
    multiarch = _build_multiarch(layout)
    images = ImageSet(
        layout=layout.path, one=one,
        one_v2s2=_as_v2s2(one, "one_v2s2", "test/one-v2s2", "1", workdir),
        multi=multi, multi_perfile=multi_perfile, multiarch=multiarch,
        multiarch_v2s2=_as_v2s2(multiarch, "multiarch_v2s2",
                                "test/multiarch", "v2s2", workdir))
    _tool("chmod", "-R", "a+rX", str(workdir))  # umoci writes blobs 0600
    return images


# --- pushing and exporting with skopeo --------------------------------------

def skopeo(*args: str) -> str:
    # --insecure-policy: the host's policy.json is no business of a test.
    return _tool("skopeo", "--insecure-policy", *args)


def push(image: Image, registry: Registry) -> str:
    """Push ``image`` to ``registry`` as it was built (no conversion);
    returns its reference there."""
    creds = (["--dest-creds", registry.creds] if registry.creds
             else ["--dest-no-creds"])
    multi = ["--all"] if image.is_index else []
    skopeo("copy", "--dest-tls-verify=false", *creds, *multi,
           image.source, f"docker://{image.at(registry)}")
    return image.at(registry)


def push_images(registry: Registry, images: Iterable[Image]) -> None:
    for image in images:
        push(image, registry)


def _chown(path: Path, owner: Any | None) -> None:
    """Give what root wrote to ``owner`` (a pwd entry), e.g. the test user."""
    if owner is None:
        return
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.lchown(p, owner.pw_uid, owner.pw_gid)


def export_oci_layout(image: Image, dest: Path, tag: str | None = None,
                      owner: Any | None = None) -> str:
    """Copy ``image`` into an OCI layout dir ``dest`` under ``tag`` (default
    the image's tag); returns skopeo's reference ``oci:DEST:TAG``."""
    ref = f"oci:{dest}:{tag or image.tag}"
    skopeo("copy", *(["--all"] if image.is_index else []), image.source, ref)
    _chown(dest, owner)
    return ref


def export_oci_archive(image: Image, path: Path, tag: str | None = None,
                       owner: Any | None = None) -> Path:
    """Write ``image`` as an OCI archive (a tar of an OCI layout)."""
    skopeo("copy", *(["--all"] if image.is_index else []), image.source,
           f"oci-archive:{path}:{tag or image.tag}")
    _chown(path, owner)
    return path


def export_docker_archive(image: Image, path: Path, name: str | None = None,
                          arch: str | None = None, owner: Any | None = None) -> Path:
    """Write ``image`` as ``docker save`` would, tagged ``name`` (default
    its repo:tag).  A docker archive holds one platform: ``arch`` picks it
    from an index (default: the host's)."""
    override = ["--override-arch", arch] if arch else []
    skopeo(*override, "copy", image.source,
           f"docker-archive:{path}:{name or image.ref}")
    _chown(path, owner)
    return path


# --- pytest fixtures ---------------------------------------------------------

@pytest.fixture(scope="session")
def test_images(busybox: Path) -> Iterator[ImageSet]:
    """Every test image, built once per session (an ImageSet)."""
    # Under /tmp with 0755, not pytest's 0700 tmp dirs, so the unprivileged
    # test user can read the layout too.
    workdir = Path(tempfile.mkdtemp(prefix="chspawner-images-", dir="/tmp"))
    workdir.chmod(0o755)
    try:
        yield build_images(workdir, busybox)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(test_images: ImageSet) -> Iterator[Registry]:
    """An anonymous registry holding every image in ``test_images``."""
    with Registry() as reg:
        push_images(reg, test_images.all())
        yield reg


@pytest.fixture(scope="session")
def basic_registry(test_images: ImageSet) -> Iterator[Registry]:
    """A registry with HTTP Basic auth (``.user``/``.password``) holding
    ``test/one:1``."""
    with Registry(auth="basic") as reg:
        push(test_images.one, reg)
        yield reg


@pytest.fixture(scope="session")
def token_registry(test_images: ImageSet) -> Iterator[Registry]:
    """A registry with Bearer-token auth from its own ``.token_server``
    (credentials ``.user``/``.password``) holding ``test/one:1``; the
    token server's request log is cleared after the push."""
    with Registry(auth="token") as reg:
        push(test_images.one, reg)
        reg.token_server.clear_requests()
        yield reg
