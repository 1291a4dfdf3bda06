"""``chspawner pull`` from real registries (Debian's docker-registry), run
as the unprivileged user, and what it pulled run by name."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from tests.harness.puller import assert_one_line_error
from tests.harness.registry import Layout, Registry, push, skopeo
from tests.harness.users import as_user, user_file
from tests.harness.wait import wait_until


def blob_gets(registry, repo):
    """How many blob downloads the registry has served for ``repo``."""
    return len(re.findall(rf'"GET /v2/{re.escape(repo)}/blobs/sha256:[0-9a-f]+ HTTP',
                          registry.log()))


# ------------------------------------------------------------- formats ----

@pytest.mark.parametrize("which", ["one", "one_v2s2"])
def test_pull_one_layer_and_run_by_name(puller, registry, test_images, which):
    image = getattr(test_images, which)
    ref = image.at(registry)
    puller.pull(ref, check=True)  # no NAME: the reference names it
    for path, content in image.files.items():
        assert (puller.image(ref) / path.lstrip("/")).read_text() == content
    out = puller.run(ref, "--", "cat", "/hello.txt").stdout
    assert out == image.files["/hello.txt"]
    meta = json.loads(puller.cli("images", "inspect", "-s", str(puller.store), ref,
                                 check=True).stdout)
    assert meta["source"] == {**meta["source"], "kind": "registry", "digest": image.digest}
    # Charliecloud runs it by name from the same store.
    ch = as_user(puller.user.pw_name, "ch-run", "-s", str(puller.store), ref, "--",
                 "cat", "/hello.txt", check=False)
    assert ch.stdout == image.files["/hello.txt"], ch.stderr


def test_multi_layer_whiteouts_and_default_command(puller, registry, test_images):
    image = test_images.multi
    assert image.whiteout_kinds == {"file", "opaque"}  # what this test is about
    puller.pull(image.at(registry), "multi", check=True)
    root = puller.image("multi")
    for path, content in image.files.items():
        assert (root / path.lstrip("/")).read_text() == content, path
    for path in image.absent:
        assert not (root / path.lstrip("/")).exists(), path
    assert not list(root.rglob(".wh.*"))
    # No command: the image's Entrypoint + Cmd, in its WorkingDir, its Env,
    # on either backend (chspawner tells ch-run what it can't read itself).
    assert puller.run("multi").stdout == image.cmd_output
    assert puller.cli("run", "--backend=ch-run", "-s", str(puller.store), "multi",
                      check=True).stdout == image.cmd_output
    # An explicit command overrides all that, as ch-run runs it: from /.
    assert puller.run("multi", "--", "pwd").stdout == "/\n"
    env = puller.run("multi", "--set-env", "--", "env").stdout
    assert "GREETING=hello" in env


def test_per_file_whiteouts(puller, registry, test_images):
    image = test_images.multi_perfile
    puller.pull(image.at(registry), "perfile", check=True)
    for path in image.absent:
        assert not (puller.image("perfile") / path.lstrip("/")).exists(), path


@pytest.mark.parametrize("which", ["multiarch", "multiarch_v2s2"])
def test_manifest_lists_pick_the_architecture(puller, registry, test_images, which):
    image = getattr(test_images, which)
    puller.pull(image.at(registry), "native", check=True)
    assert (puller.image("native") / "arch.txt").read_text() == "amd64\n"
    puller.pull(image.at(registry), "arm", opts=["--arch", "arm64"], check=True)
    assert (puller.image("arm") / "arch.txt").read_text() == "arm64\n"
    result = puller.pull(image.at(registry), "none", opts=["--arch", "s390x"])
    assert_one_line_error(result, "linux/s390x", "linux/amd64", "linux/arm64")
    assert not puller.image("none").exists() and puller.clean()


def test_pull_by_digest(puller, registry, test_images):
    image = test_images.one
    ref = f"{registry.host}/{image.repo}@{image.digest}"
    puller.pull(ref, "pinned", check=True)
    assert (puller.image("pinned") / "hello.txt").exists()


# ---------------------------------------------------------------- auth ----

def test_basic_auth(puller, basic_registry, test_images, user, user_dir):
    ref = test_images.one.at(basic_registry)
    assert_one_line_error(puller.pull(ref, "x"), basic_registry.host, "401")
    env = [f"CHSPAWNER_REGISTRY_USER={basic_registry.user}",
           f"CHSPAWNER_REGISTRY_PASSWORD={basic_registry.password}"]
    puller.pull(ref, "from-env", env=env, check=True)
    # Or the credentials "docker login" leaves in ~/.docker/config.json.
    config = user_dir / "docker"
    as_user(user.pw_name, "mkdir", str(config))
    token = f"{basic_registry.user}:{basic_registry.password}".encode()
    import base64
    user_file(user, config / "config.json", json.dumps(
        {"auths": {basic_registry.host: {"auth": base64.b64encode(token).decode()}}}))
    puller.pull(ref, "from-config", env=[f"DOCKER_CONFIG={config}"], check=True)
    wrong = [f"CHSPAWNER_REGISTRY_USER={basic_registry.user}",
             "CHSPAWNER_REGISTRY_PASSWORD=wrong"]
    assert_one_line_error(puller.pull(ref, "bad", env=wrong), "401")


def test_bearer_token_flow(puller, token_registry, test_images):
    ref = test_images.one.at(token_registry)
    server = token_registry.token_server
    assert_one_line_error(puller.pull(ref, "anon"), "401")
    server.clear_requests()
    env = [f"CHSPAWNER_REGISTRY_USER={token_registry.user}",
           f"CHSPAWNER_REGISTRY_PASSWORD={token_registry.password}"]
    puller.pull(ref, "tok", env=env, check=True)
    assert (puller.image("tok") / "hello.txt").exists()
    assert server.requests
    for request in server.requests:
        assert request.credentials and request.user == token_registry.user
        assert request.status == 200
        assert "repository:test/one:pull" in request.scopes


# -------------------------------------------------------------- errors ----

def test_not_found(puller, registry):
    result = puller.pull(f"{registry.host}/test/nothere:1", "x")
    assert_one_line_error(result, registry.host, "test/nothere:1", "404")
    assert not puller.image("x").exists() and puller.clean()


def test_network_down(puller):
    result = puller.pull("127.0.0.1:9/test/one:1", "x")  # discard port: nobody
    assert_one_line_error(result, "127.0.0.1:9", "can't reach")


def test_digest_mismatch(puller, test_images):
    """A registry serving a corrupted layer: refused, nothing kept."""
    with Registry() as reg:
        push(test_images.one, reg)
        blobs = reg.storage / "docker/registry/v2/blobs/sha256"
        layer = max(blobs.rglob("data"), key=lambda p: p.stat().st_size)
        data = bytearray(layer.read_bytes())
        data[len(data) // 2] ^= 0xFF
        layer.write_bytes(bytes(data))
        result = puller.pull(test_images.one.at(reg), "x")
    assert_one_line_error(result, "digest mismatch")
    assert not puller.image("x").exists() and puller.clean()
    assert not [p for p in (puller.store / "dlcache").iterdir()
                if not p.name.endswith(".partial")]


# ---------------------------------------------------- cache and resume ----

def test_layer_cache_is_shared_between_pulls(puller, registry, test_images):
    image = test_images.multi
    puller.pull(image.at(registry), "first", check=True)
    before = blob_gets(registry, image.repo)
    puller.pull(image.at(registry), "second", check=True)
    # Only the config blob is fetched again; every layer comes from the cache.
    assert blob_gets(registry, image.repo) - before == 1
    assert (puller.image("second") / "data/new.txt").exists()


@pytest.fixture
def big_registry(test_images, tmp_path):
    """A registry holding test/big:1, whose one layer is 48 MiB of random
    bytes: big enough to interrupt a download midway."""
    layout = Layout(tmp_path, test_images.layout.parent / "none")
    with layout.edit("empty", "big") as rootfs:
        (rootfs / "big").write_bytes(os.urandom(48 << 20))
    with Registry() as reg:
        skopeo("copy", "--dest-tls-verify=false", "--dest-no-creds",
               f"oci:{layout.path}:big", f"docker://{reg.host}/test/big:1")
        yield reg


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_pull_leaves_store_clean_and_resumes(puller, big_registry, sig):
    ref = f"{big_registry.host}/test/big:1"
    proc = subprocess.Popen(puller.argv("pull", "-q", "--insecure", "-s",
                                        str(puller.store), ref, "big"),
                            stderr=subprocess.PIPE, text=True)
    partials = lambda: list((puller.store / "dlcache").glob("*.partial")) \
        if (puller.store / "dlcache").exists() else []
    try:
        wait_until(lambda: any(p.stat().st_size > 0 for p in partials()), "a partial blob",
                   every=0.005)
        # Freeze the registry so the download is surely midway, then stop
        # the pull the way a user or a batch system would.
        os.kill(big_registry.process.pid, signal.SIGSTOP)
        try:
            proc.send_signal(sig)
            proc.wait(timeout=60)
        finally:
            os.kill(big_registry.process.pid, signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert not puller.image("big").exists()
    (partial,) = partials()
    kept = partial.stat().st_size
    assert 0 < kept < 48 << 20
    if sig == signal.SIGINT:
        assert puller.clean()
    # The next pull resumes from where the first stopped.
    puller.pull(ref, "big", check=True)
    assert puller.clean() and not partials()
    assert (puller.image("big") / "big").stat().st_size == 48 << 20
    resumed = re.findall(r'http.response.status=206.*?http.response.written=(\d+)|'
                         r'http.response.written=(\d+).*?http.response.status=206',
                         big_registry.log())
    assert resumed, "no ranged (206) response in the registry log"
