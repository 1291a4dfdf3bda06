"""The registry harness works: real servers, real images, real clients.

Only real clients talk to the harness here (urllib, aiohttp, skopeo, umoci),
so these tests prove what the pull tests will rely on.
"""
from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import re
import subprocess
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path

import aiohttp
import jwt
import pytest

from tests.harness.registry import (ACCEPT_ALL, DIRECT, MEDIA_TYPES, Image, ImageSet,
                                    Registry, TokenServer, export_docker_archive,
                                    export_oci_archive, export_oci_layout)
from tests.harness.users import as_user

# The fixtures (registry, basic_registry, token_registry, test_images) come
# from conftest, which imports them from tests.harness.registry: one
# definition for every module, so a session builds the images and starts
# each registry once.


# --- a tiny registry client on urllib -----------------------------------------

def get(url: str, accept: str = ACCEPT_ALL, auth: str | None = None
        ) -> tuple[int, Message, bytes]:
    """GET url: (status, headers, body), also for 4xx answers.  The headers
    are looked up case-insensitively (Go sends "Www-Authenticate")."""
    headers = {"Accept": accept}
    if auth:
        headers["Authorization"] = auth
    request = urllib.request.Request(url, headers=headers)
    try:
        with DIRECT.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def manifest(reg: Registry, repo: str, ref: str, accept: str = ACCEPT_ALL,
             auth: str | None = None) -> tuple[dict, Message]:
    status, headers, body = get(f"{reg.url}/v2/{repo}/manifests/{ref}", accept, auth)
    assert status == 200, (status, body)
    return json.loads(body), headers


def blob(reg: Registry, repo: str, digest: str) -> bytes:
    status, _, body = get(f"{reg.url}/v2/{repo}/blobs/{digest}", accept="*/*")
    assert status == 200, status
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    return body


def layer_files(layer_gz: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer_gz))) as tar:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers()}


def layer_text(layer_gz: bytes, name: str) -> str:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer_gz))) as tar:
        return tar.extractfile(name).read().decode()


def challenge(header: str) -> dict[str, str]:
    """``Bearer realm="R",service="S",scope="X"`` -> its parameters."""
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer", header
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


# --- anonymous registry ---------------------------------------------------------

def test_anonymous_manifest_and_layer(registry, test_images: ImageSet):
    one = test_images.one
    doc, headers = manifest(registry, one.repo, one.tag, MEDIA_TYPES["oci_manifest"])
    assert headers["Content-Type"] == MEDIA_TYPES["oci_manifest"] == one.media_type
    assert headers["Docker-Content-Digest"] == one.digest
    assert len(doc["layers"]) == one.layers == 1
    layer = blob(registry, one.repo, doc["layers"][0]["digest"])
    assert layer_text(layer, "hello.txt") == one.files["/hello.txt"]
    assert "bin/busybox" in layer_files(layer)


def test_v2s2_image_is_docker_v2(registry, test_images: ImageSet):
    image = test_images.one_v2s2
    doc, headers = manifest(registry, image.repo, image.tag,
                            MEDIA_TYPES["docker_manifest"])
    assert doc["mediaType"] == MEDIA_TYPES["docker_manifest"] == image.media_type
    assert headers["Docker-Content-Digest"] == image.digest
    assert doc["layers"][0]["mediaType"] == \
        "application/vnd.docker.image.rootfs.diff.tar.gzip"


def test_skopeo_sees_every_image(registry, test_images: ImageSet):
    for image in test_images.all():
        out = subprocess.run(
            ["skopeo", "--insecure-policy", "inspect", "--raw", "--tls-verify=false",
             f"docker://{image.at(registry)}"],
            capture_output=True, check=True)
        assert "sha256:" + hashlib.sha256(out.stdout).hexdigest() == image.digest, \
            image.name


# --- multi-arch -------------------------------------------------------------------

@pytest.mark.parametrize("name, list_type", [
    ("multiarch", "oci_index"), ("multiarch_v2s2", "docker_list")])
def test_multiarch_tag_is_a_list(registry, test_images: ImageSet, name, list_type):
    image: Image = getattr(test_images, name)
    accept = f"{MEDIA_TYPES['oci_index']}, {MEDIA_TYPES['docker_list']}"
    doc, headers = manifest(registry, image.repo, image.tag, accept)
    assert headers["Content-Type"] == MEDIA_TYPES[list_type] == image.media_type
    assert headers["Docker-Content-Digest"] == image.digest
    platforms = {f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"]
                 for m in doc["manifests"]}
    assert platforms == {p: i.digest for p, i in image.platforms.items()}
    assert set(platforms) == {"linux/amd64", "linux/arm64"}
    # Each platform's image says its architecture and holds its /arch.txt.
    for platform, digest in platforms.items():
        sub, _ = manifest(registry, image.repo, digest)
        config = json.loads(blob(registry, image.repo, sub["config"]["digest"]))
        assert f"{config['os']}/{config['architecture']}" == platform
        last = blob(registry, image.repo, sub["layers"][-1]["digest"])
        assert layer_text(last, "arch.txt") == image.platforms[platform].files["/arch.txt"]


def test_oci_index_needs_accept(registry, test_images: ImageSet):
    """distribution 2.8 won't hand an OCI index to a client that doesn't
    list it in Accept: a pull client must send it."""
    image = test_images.multiarch
    status, _, body = get(f"{registry.url}/v2/{image.repo}/manifests/{image.tag}",
                          accept=MEDIA_TYPES["docker_manifest"])
    assert status == 404 and b"MANIFEST_UNKNOWN" in body


# --- multi-layer and whiteouts ----------------------------------------------------

def test_multi_layer_whiteouts_and_config(registry, test_images: ImageSet):
    image = test_images.multi
    doc, _ = manifest(registry, image.repo, image.tag)
    assert len(doc["layers"]) == image.layers == 3
    last = layer_files(blob(registry, image.repo, doc["layers"][-1]["digest"]))
    assert image.whiteouts == {"data/.wh.gone.txt": "file",
                               "data/opaque/.wh..wh..opq": "opaque"}
    assert set(image.whiteouts) <= set(last)
    assert not any(n.startswith("data/opaque/.wh.old") for n in last)
    # Docker's order: directory, its opaque marker, then its new contents.
    names = list(last)
    assert names.index("data/opaque") < names.index("data/opaque/.wh..wh..opq") \
        < names.index("data/opaque/fresh.txt")
    config = json.loads(blob(registry, image.repo, doc["config"]["digest"]))
    for key, value in image.config.items():
        assert config["config"][key] == value, key
    assert len(config["rootfs"]["diff_ids"]) == 3


def test_multi_perfile_has_only_umoci_whiteouts(registry, test_images: ImageSet):
    image = test_images.multi_perfile
    doc, _ = manifest(registry, image.repo, image.tag)
    last = layer_files(blob(registry, image.repo, doc["layers"][-1]["digest"]))
    assert image.whiteout_kinds == {"file"}
    assert {"data/.wh.gone.txt", "data/opaque/.wh.old1.txt",
            "data/opaque/.wh.old2.txt"} <= set(last)


@pytest.mark.parametrize("name", ["one", "multi", "multi_perfile"])
def test_flattened_rootfs_matches_description(registry, test_images: ImageSet,
                                              tmp_path: Path, name):
    """Pull back with skopeo, flatten with umoci: the files are as described."""
    image: Image = getattr(test_images, name)
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                    f"docker://{image.at(registry)}", f"oci:{tmp_path}/oci:x"],
                   check=True, capture_output=True)
    subprocess.run(["umoci", "unpack", "--image", f"{tmp_path}/oci:x",
                    str(tmp_path / "bundle")], check=True, capture_output=True)
    rootfs = tmp_path / "bundle" / "rootfs"
    for path, text in image.files.items():
        assert (rootfs / path.lstrip("/")).read_text() == text, path
    for path in image.absent:
        assert not (rootfs / path.lstrip("/")).exists(), path
    assert (rootfs / "bin" / "busybox").is_file()


# --- basic auth -------------------------------------------------------------------

def test_basic_registry_needs_credentials(basic_registry, test_images: ImageSet):
    url = f"{basic_registry.url}/v2/test/one/manifests/1"
    status, headers, _ = get(url)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    status, _, _ = get(url, auth=basic(basic_registry.user, "wrong"))
    assert status == 401
    status, headers, _ = get(url, auth=basic(basic_registry.user, basic_registry.password))
    assert status == 200
    assert headers["Docker-Content-Digest"] == test_images.one.digest


# --- token auth -------------------------------------------------------------------

async def token_flow(reg: Registry, path: str, user: str | None,
                     password: str | None) -> tuple[int, dict, int]:
    """What a pull client does: try, read the Bearer challenge, get a token
    from the realm, retry.  Returns (token status, claims, retry status)."""
    url = reg.url + path
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
            assert response.status == 401
            params = challenge(response.headers["WWW-Authenticate"])
        assert params["realm"] == reg.token_server.realm
        query = {"service": params["service"], "scope": params["scope"]}
        creds = {} if user is None else {"Authorization": basic(user, password)}
        async with session.get(params["realm"], params=query, headers=creds) as response:
            if response.status != 200:
                return response.status, {}, 0
            token = (await response.json())["token"]
        claims = jwt.decode(token, reg.token_server.public_key, algorithms=["RS256"],
                            audience=params["service"])
        headers = {"Accept": ACCEPT_ALL, "Authorization": f"Bearer {token}"}
        async with session.get(url, headers=headers) as response:
            return 200, claims, response.status


def test_token_registry_challenge_token_retry(token_registry):
    tokens = token_registry.token_server
    tokens.clear_requests()
    status, headers, _ = get(f"{token_registry.url}/v2/test/one/manifests/1")
    assert status == 401
    params = challenge(headers["WWW-Authenticate"])
    assert params == {"realm": tokens.realm, "service": tokens.service,
                      "scope": "repository:test/one:pull"}

    token_status, claims, retry = asyncio.run(token_flow(
        token_registry, "/v2/test/one/manifests/1",
        token_registry.user, token_registry.password))
    assert (token_status, retry) == (200, 200)
    assert claims["sub"] == token_registry.user
    assert claims["access"] == [{"type": "repository", "name": "test/one",
                                 "actions": ["pull"]}]
    [seen] = tokens.requests
    assert (seen.path, seen.credentials, seen.user, seen.status) == \
        ("/token", True, token_registry.user, 200)
    assert seen.scopes == ["repository:test/one:pull"]


@pytest.mark.parametrize("password", [None, "wrong"])
def test_token_server_refuses(token_registry, password):
    user = None if password is None else token_registry.user
    status, _, _ = asyncio.run(token_flow(
        token_registry, "/v2/test/one/manifests/1", user, password))
    assert status == 401
    assert token_registry.token_server.requests[-1].credentials == (user is not None)


def test_token_server_oauth2_post(token_registry):
    """The OAuth2 form (POST, grant_type=password) that some clients use."""
    tokens = token_registry.token_server

    async def post() -> tuple[int, dict]:
        form = {"grant_type": "password", "service": tokens.service,
                "client_id": "chspawner-test", "scope": "repository:test/one:pull",
                "username": token_registry.user, "password": token_registry.password}
        async with aiohttp.ClientSession() as session:
            async with session.post(tokens.realm, data=form) as response:
                return response.status, await response.json()

    status, body = asyncio.run(post())
    assert status == 200 and body["access_token"] == body["token"]
    assert body["expires_in"] == 300
    assert tokens.requests[-1].method == "POST"


def test_skopeo_through_token_server(token_registry, test_images: ImageSet):
    tokens = token_registry.token_server
    tokens.clear_requests()
    out = subprocess.run(
        ["skopeo", "--insecure-policy", "inspect", "--raw", "--tls-verify=false",
         "--creds", token_registry.creds, f"docker://{test_images.one.at(token_registry)}"],
        capture_output=True, check=True)
    assert "sha256:" + hashlib.sha256(out.stdout).hexdigest() == test_images.one.digest
    assert any(r.credentials and r.status == 200 for r in tokens.requests)


def test_anonymous_pull_tokens_on_shared_storage(token_registry, test_images: ImageSet):
    """A second registry process on the token registry's storage, with a
    token server that gives anonymous clients pull-only tokens."""
    with TokenServer(anonymous_pull=True) as tokens, \
            Registry(auth="token", token_server=tokens,
                     storage=token_registry.storage) as second:
        status, claims, retry = asyncio.run(token_flow(
            second, "/v2/test/one/manifests/1", None, None))
        assert (status, retry) == (200, 200)
        assert claims["access"][0]["actions"] == ["pull"]
        # Asked for push too, an anonymous client still only gets pull.
        query = urllib.parse.urlencode({"service": tokens.service,
                                        "scope": "repository:test/one:pull,push"})
        _, _, body = get(f"{tokens.realm}?{query}")
        token = json.loads(body)["token"]
        granted = jwt.decode(token, options={"verify_signature": False})["access"]
        assert granted == [{"type": "repository", "name": "test/one", "actions": ["pull"]}]
    # The second process left the shared storage alone.
    assert (token_registry.storage / "docker").is_dir()
    status, _, _ = get(f"{token_registry.url}/v2/test/one/manifests/1")
    assert status == 401  # still up, still asking for a token


def test_failed_start_is_one_line_with_log_tail(tmp_path: Path):
    tokens = TokenServer(workdir=tmp_path / "tokens").start()
    try:
        tokens.cert_path.unlink()  # the registry refuses to start without it
        with pytest.raises(RuntimeError) as error:
            Registry(tmp_path / "reg", auth="token", token_server=tokens).start()
    finally:
        tokens.stop()
    message = str(error.value)
    assert "\n" not in message
    assert "exited" in message and "panic: " in message and "token-root.pem" in message


# --- exports ------------------------------------------------------------------------

def test_exports_are_written(test_images: ImageSet, user, user_dir: Path):
    one = test_images.one
    archive = export_docker_archive(one, user_dir / "one.docker.tar", owner=user)
    with tarfile.open(archive) as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))
    # skopeo writes the normalized name; `docker save` would write test/one:1.
    assert entry["RepoTags"] == ["docker.io/test/one:1"] and len(entry["Layers"]) == 1

    archive = export_oci_archive(test_images.multiarch, user_dir / "ma.oci.tar", owner=user)
    with tarfile.open(archive) as tar:
        assert {"oci-layout", "index.json"} <= set(tar.getnames())
        index = json.load(tar.extractfile("index.json"))
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "1"

    ref = export_oci_layout(test_images.multi, user_dir / "layout", owner=user)
    assert ref == f"oci:{user_dir}/layout:1"
    # Written as root, handed to the test user, who can read it all.
    as_user(user.pw_name, "skopeo", "--insecure-policy", "inspect", ref)
    assert (user_dir / "layout" / "index.json").stat().st_uid == user.pw_uid
