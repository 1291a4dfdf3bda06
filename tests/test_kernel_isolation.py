"""Other users can neither read nor drive a user's kernel.

A kernel's ZeroMQ sockets carry its code and output; the HMAC key signs
but hides nothing, and IOPub is a PUB socket anyone reaching it may
subscribe to. Two real accounts: ``chtest`` runs a kernel through the
chspawner provisioner (on this host, or on a compute node of the test
cluster) that prints a secret; ``chtest2``, the attacker, knows where the
kernel's sockets are and subscribes to all of them, and to every TCP port
the victim's processes listen on, and must receive nothing.

And the keeper of a kernel in a job (on TCP): a hostile peer's huge
message, an unauthenticated connection and a replayed signed request are
all refused, and its memory stays small, while it goes on serving.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq

from tests.harness.env import AS_USER, CHSPAWNER, VENV_BIN
from tests.harness.users import as_user

from chspawner.persist.keeper import sign, signed_request

SECRET = "the-victims-secret-4c1d"

# The victim, as chtest: starts a kernel, says where its sockets are, and on
# "go" (a line on stdin) has it print the secret a few times.
VICTIM = textwrap.dedent('''
    import json, os, sys, time
    from jupyter_client.manager import KernelManager
    name, storage = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    if storage:
        from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager
        km = KernelManager(kernel_name=name,
                           kernel_spec_manager=ContainerKernelSpecManager(storage=storage))
    else:
        km = KernelManager(kernel_name=name)
    km.start_kernel()
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
    def run(code):
        out = []
        kc.execute_interactive(code, timeout=60,
            output_hook=lambda m: out.append(m["content"].get("text", "")))
        return "".join(out)
    info = km.get_connection_info()
    ports = [info[p] for p in ("shell_port", "iopub_port", "stdin_port", "hb_port",
                               "control_port")]
    where = {"transport": info["transport"], "ip": info["ip"], "ports": ports,
             "kernel_pid": int(run("import os; print(os.getpid())")),
             # Public keys are not secrets: say it, the attacker may know it.
             "curve_publickey": info.get("curve_publickey")}
    if info["transport"] == "ipc":
        where["ipc"] = [f"{info['ip']}-{p}" for p in ports]
    else:  # the kernel's own sockets on the node, behind its relay
        relay_file = km.provisioner.staging / "relay.json"
        relay = json.loads(relay_file.read_text()) if relay_file.exists() else {}
        where["ipc"] = [f"{relay['kernel_ipc']}-{p}"
                        for p in relay.get("kernel_ports", {}).values()]
    where["dir_modes"] = sorted({os.stat(os.path.dirname(p)).st_mode & 0o777
                                 for p in where["ipc"]})
    print(json.dumps(where), flush=True)
    sys.stdin.readline()  # the attacker listens
    got = run("for _ in range(20):\\n    print(%r, flush=True); __import__('time').sleep(0.1)"
              % sys.argv[-1])
    print(json.dumps({"victim_saw_secret": sys.argv[-1] in got}), flush=True)
    sys.stdin.readline()
    kc.stop_channels()
    km.shutdown_kernel(now=True)
''')

# The attacker, as chtest2: connects to the kernel's Unix sockets, and
# subscribes to them and to every TCP port the victim listens on (found in
# /proc/net/tcp, which anyone may read); says "ready", listens until stdin
# closes, and reports what it got.
ATTACKER = textwrap.dedent('''
    import json, select, socket, sys, zmq
    where, victim_uid, secret = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    report = {"unix": {}, "tcp_ports": [], "messages": 0, "secret": False}
    for path in where["ipc"]:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            report["unix"][path] = "connected"
        except OSError as e:
            report["unix"][path] = type(e).__name__
        s.close()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[7]) == victim_uid:  # LISTEN, the victim's
                report["tcp_ports"].append(int(f[1].rsplit(":", 1)[1], 16))
    ctx = zmq.Context()
    socks = []
    def sub(url, curve=False):
        s = ctx.socket(zmq.SUB); s.linger = 0
        s.setsockopt(zmq.SUBSCRIBE, b"")
        if curve:  # the server's public key, and a key pair of our own
            s.curve_serverkey = where["curve_publickey"].encode()
            s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.connect(url); socks.append(s)
    for path in where["ipc"]:
        sub(f"ipc://{path}")
    for port in sorted(set(report["tcp_ports"])):
        sub(f"tcp://127.0.0.1:{port}")
        if where.get("curve_publickey"):
            sub(f"tcp://127.0.0.1:{port}", curve=True)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        for s, _ in poller.poll(100):
            frames = s.recv_multipart()
            report["messages"] += 1
            report["secret"] = report["secret"] or any(secret.encode() in f for f in frames)
    print(json.dumps(report), flush=True)
''')


def _spawn(user: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return subprocess.Popen([str(AS_USER), user, "env", *extra, *argv], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _line(process: subprocess.Popen, what: str) -> str:
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise AssertionError(f"{what} ended: {process.stderr.read()[-3000:]}")
    return line.strip()


def _end(victim: subprocess.Popen) -> None:
    """Let the victim shut its kernel down and exit."""
    try:
        victim.stdin.write("end\n"); victim.stdin.flush()
    except OSError:
        pass  # gone already
    victim.wait(120)


def tcp_listeners_of(pid: int) -> list[str]:
    """The TCP sockets process ``pid`` listens on (``ss``, as root)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


def attack(victim: subprocess.Popen, attacker_user, victim_user) -> tuple[dict, dict, dict]:
    """Run the attacker against the victim's kernel while it prints the
    secret: (where the kernel was, what the attacker got, what the victim saw)."""
    where = json.loads(_line(victim, "the victim"))
    attacker = _spawn(attacker_user.pw_name, [str(VENV_BIN / "python"), "-c", ATTACKER,
                                              json.dumps(where), str(victim_user.pw_uid),
                                              SECRET])
    try:
        assert _line(attacker, "the attacker") == "ready"
        victim.stdin.write("go\n"); victim.stdin.flush()
        seen = json.loads(_line(victim, "the victim"))
        attacker.stdin.close()
        report = json.loads(_line(attacker, "the attacker"))
    finally:
        attacker.kill()
        _end(victim)
    return where, report, seen


def _check(where: dict, report: dict, seen: dict) -> None:
    assert seen == {"victim_saw_secret": True}  # the kernel did print it
    assert not report["secret"], report
    assert report["unix"] and set(report["unix"].values()) == {"PermissionError"}, report
    assert where["dir_modes"] == [0o700]


@pytest.fixture
def shared_tmp(user_dir) -> Path:
    """The victim's TMPDIR, open to others: only the kernel's own staging
    directory may keep them out."""
    user_dir.chmod(0o755)
    return user_dir


def test_a_local_kernel_cannot_be_read_by_another_user(user, other_user, shared_tmp,
                                                       kernel_store):
    victim = _spawn(user.pw_name, [str(VENV_BIN / "python"), "-c", VICTIM,
                                   "chspawner-deb--python3", kernel_store, SECRET],
                    env={"TMPDIR": str(shared_tmp)})
    try:
        where, report, seen = attack(victim, other_user, user)
    finally:
        victim.kill()
    _check(where, report, seen)
    assert where["transport"] == "ipc"
    assert where["ip"].startswith(f"{shared_tmp}/chspawner-kernel-")
    # The kernel listens on no TCP port at all (checked while it ran: the
    # attacker found none of its ports among the victim's listeners).
    assert not (set(where["ports"]) & set(report["tcp_ports"]))


def test_a_local_kernel_listens_on_no_tcp_port(user, shared_tmp, kernel_store):
    """None of its five channels. (ipykernel itself binds one more socket,
    on 127.0.0.1: a PULL socket for the output of forked subprocesses,
    which peers can only write to, and which drops what doesn't carry a
    random token of the kernel's; the attack test above subscribes to it
    too, and gets nothing.)"""
    victim = _spawn(user.pw_name, [str(VENV_BIN / "python"), "-c", VICTIM,
                                   "chspawner-deb--python3", kernel_store, SECRET],
                    env={"TMPDIR": str(shared_tmp)})
    try:
        where = json.loads(_line(victim, "the victim"))
        listening = tcp_listeners_of(where["kernel_pid"])
        victim.stdin.write("go\n"); victim.stdin.flush()
        _line(victim, "the victim")
        _end(victim)
    finally:
        victim.kill()
    assert len(listening) <= 1, listening
    assert all(" 127.0.0.1:" in line for line in listening), listening
    assert not any(f":{port} " in line for line in listening for port in where["ports"])


@pytest.mark.parametrize("launcher", ["srun", "sbatch"])
def test_a_kernel_on_a_node_cannot_be_read_by_another_user(user, other_user, user_dir,
                                                           kernel_store, slurm, launcher):
    """The kernel binds IPC in a private directory on the node; its relay's
    TCP ports speak only CurveZMQ, to the kernel's own key: neither a
    plaintext subscriber nor a CURVE client with a key of its own (and the
    relay's public key) gets anything."""
    prefix = user_dir / "prefix"
    as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s", kernel_store,
            "--prefix", str(prefix), "--launcher", launcher,
            f"--{launcher}-arg=--partition={slurm.partition}", "--name", "iso", "deb")
    victim = _spawn(user.pw_name, [str(VENV_BIN / "python"), "-c", VICTIM, "iso", SECRET],
                    env={"JUPYTER_PATH": f"{prefix}/share/jupyter", **slurm.env})
    try:
        where, report, seen = attack(victim, other_user, user)
    finally:
        victim.kill()
    _check(where, report, seen)
    assert where["transport"] == "tcp" and where["curve_publickey"]
    # The relay's ports were found and tried, in plaintext and with CURVE.
    assert set(where["ports"]) <= set(report["tcp_ports"]), report


# ------------------------------------------------------------ keeper ----

FAKE_KERNEL = textwrap.dedent('''
    import json, signal, sys, zmq
    staging = sys.argv[1]
    pub = zmq.Context().socket(zmq.PUB)
    pub.bind(f"ipc://{staging}/k-2")
    with open(f"{staging}/relay.json", "w") as f:
        json.dump({"kernel_ipc": f"{staging}/k", "kernel_ports": {"iopub_port": 2}}, f)
    signal.sigwait({signal.SIGTERM})
''')


def rss(pid: int) -> int:
    """Resident memory of ``pid``, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"process {pid} is gone")


@pytest.fixture
def tcp_keeper(tmp_path):
    """A keeper as in a kernel's job, listening on TCP, its kernel a
    stand-in: (process, address, HMAC key, CURVE keys)."""
    public, secret = zmq.curve_keypair()
    key = os.urandom(16).hex()
    staging = tmp_path
    (staging / "kernel.json").write_text(json.dumps({
        "key": key, "curve_publickey": public.decode(), "curve_secretkey": secret.decode()}))
    (staging / "record.json").write_text("{}")
    keeper = subprocess.Popen(
        [sys.executable, "-m", "chspawner.persist.keeper", "--job",
         "--address", "tcp://127.0.0.1:*", "--record", str(staging / "record.json"),
         "--connection-file", str(staging / "kernel.json"),
         "--address-file", str(staging / "keeper"), "--grace", "2", "--",
         sys.executable, "-c", FAKE_KERNEL, str(staging)])
    deadline = time.monotonic() + 30
    while not (staging / "keeper").exists():
        assert keeper.poll() is None and time.monotonic() < deadline, "the keeper didn't listen"
        time.sleep(0.05)  # a polling interval: nothing signals the write
    port = json.loads((staging / "keeper").read_text())["port"]
    yield keeper, f"tcp://127.0.0.1:{port}", key.encode(), (public, secret)
    (staging / "record.json").unlink()  # unwanted: it ends its kernel, then itself
    try:
        keeper.wait(30)
    finally:
        keeper.kill()


def _ask(address: str, frames: list[bytes], curve: tuple[bytes, bytes] | None,
         server_key: bytes | None = None, timeout: float = 1.5) -> list[bytes] | None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        if curve:
            sock.curve_serverkey = server_key or curve[0]
            sock.curve_publickey, sock.curve_secretkey = curve
        sock.connect(address)
        sock.send_multipart(frames)
        return sock.recv_multipart() if sock.poll(int(timeout * 1000)) else None
    finally:
        sock.close()


def _flood(port: int, mechanism: bytes, budget: int = 256 << 20) -> int:
    """A hostile peer: a ZMTP 3 greeting, then a frame that says it is
    1 GiB long, then as much of it as the keeper takes (up to ``budget``);
    how many bytes it took."""
    greeting = (b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00"
                + mechanism.ljust(20, b"\0") + b"\0" + b"\0" * 31)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(greeting)
            s.sendall(b"\x02" + (1 << 30).to_bytes(8, "big"))  # a long frame: 1 GiB
            chunk = b"\0" * (1 << 20)
            while sent < budget:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # dropped: what it should do
    return sent


def test_keeper_on_tcp_refuses_hostile_peers_and_replays(tcp_keeper):
    keeper, address, key, curve = tcp_keeper
    port = int(address.rpartition(":")[2])
    assert _ask(address, signed_request(key, [b"info"]), curve)[0] == b"info"
    before = rss(keeper.pid)

    # Unauthenticated: no CURVE, or a key pair of one's own (with the
    # keeper's public key): no answer, however well signed.
    assert _ask(address, signed_request(key, [b"info"]), None) is None
    assert _ask(address, signed_request(key, [b"info"]), zmq.curve_keypair(),
                server_key=curve[0]) is None
    # A frame announced as 1 GiB: dropped before it is buffered.
    taken = [_flood(port, m) for m in (b"NULL", b"CURVE")]
    # Even from the key's holder: bigger than any request, dropped unread.
    assert _ask(address, [b"info", b"x" * (128 << 20)], curve) is None
    # A signed request seen before, or signed long ago: refused.
    request = signed_request(key, [b"info"])
    assert _ask(address, request, curve)[0] == b"info"
    assert _ask(address, request, curve) is None
    old = [b"info", repr(time.time() - 3600).encode(), os.urandom(16).hex().encode()]
    assert _ask(address, [*old, sign(key, old)], curve) is None

    assert keeper.poll() is None
    grown = rss(keeper.pid) - before
    assert grown < 32 << 20, f"the keeper grew by {grown} bytes"
    assert all(t < 64 << 20 for t in taken), taken
    # And it still serves its server.
    assert _ask(address, signed_request(key, [b"info"]), curve)[0] == b"info"
