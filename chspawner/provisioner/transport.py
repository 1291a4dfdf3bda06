"""Private transport for kernels: IPC where client and kernel share a host,
CurveZMQ across the network.

A kernel's ZeroMQ sockets carry its code and output; the HMAC key in the
connection file signs messages but hides nothing, and IOPub is a PUB socket
anyone may subscribe to. So no kernel of ours listens on TCP:

- on the client's host it binds ZeroMQ IPC (Unix) sockets in the
  provisioner's private staging directory (mode 0700): other users can't
  even reach them;
- on a compute node (launcher srun or sbatch) it binds IPC sockets in a
  private node-local directory, and a *relay* (this module's command line,
  run inside the job, outside the container) exposes its five channels on
  TCP with CurveZMQ: encrypted, and only the holder of the kernel's CURVE
  key pair (jupyter_client's ``curve_publickey`` / ``curve_secretkey``,
  made by the provisioner and handed over in the 0600 connection file under
  $HOME) gets past the ZAP handler. jupyter_client applies those keys to
  every socket it connects, so its clients talk to the relay directly.

The relay, ``python -m chspawner.provisioner.transport --connection-file FILE --
KERNEL COMMAND``, reads FILE (the staged connection file, in the shared
$HOME), rewrites it for the kernel (transport ipc in a new private
directory under the node's $TMPDIR, which the container sees at /tmp),
starts the kernel on IPC "ports" chosen here (1-5: names in that
directory, so any kernel can be given them, whether or not it writes its
ports back), waits until it has bound them, binds one TCP port per
channel (those FILE asked for when it can: a restart keeps them) and writes
``relay.json`` beside FILE: the node's name, the TCP ports, and where the
kernel's IPC sockets are on the node (for the keeper of a kernel in a job of
its own). It ends when the kernel does, with its status.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The relay starts on the node before every kernel there, in series with
# it: it imports only what it needs first (not typing or dataclasses, some
# 30 ms), and zmq where it is used, after it started its kernel, so that
# the kernel's start overlaps the import of zmq (see run_relay).
TYPE_CHECKING = False  # (typing's, without importing typing)
if TYPE_CHECKING:
    import zmq
    from zmq.auth.thread import ThreadAuthenticator

PORTS = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
#: Longest path a Unix socket address takes (sun_path, less its NUL).
MAX_SOCKET_PATH = 107
#: What a kernel's socket path adds to its prefix ("-" and a port number).
PORT_SUFFIX = len("-99")
#: ZAP domains: the heartbeat echoes and carries nothing, and jupyter_client
#: connects it with a throwaway client key; the others take only the kernel's.
KERNEL_DOMAIN, HB_DOMAIN = "chspawner-kernel", "chspawner-hb"
#: The largest heartbeat a relay takes (its peers need not hold the
#: kernel's key, see HB_DOMAIN; pings are a few bytes): a bigger one drops
#: its sender before it is buffered.
MAX_PING = 4 << 10


class TransportError(RuntimeError):
    """The kernel's private transport can't be set up; the message says why."""


def ipc_prefix(directory: Path, name: str = "k") -> str:
    """The ``ip`` of a kernel on IPC in ``directory``: sockets are
    PREFIX-1 ... PREFIX-5. Fails clearly when Unix sockets can't be that long."""
    prefix = str(directory / name)
    if len(prefix.encode()) + PORT_SUFFIX > MAX_SOCKET_PATH:
        raise TransportError(f"directory {directory} is too deep for the kernel's Unix "
                             f"sockets ({MAX_SOCKET_PATH} bytes at most): set a shorter TMPDIR")
    return prefix


# -------------------------------------------------------------- CURVE ---

class CurveKeys:
    """A kernel's CURVE key pair (z85, as jupyter_client holds it). The
    relay serves with it; its one allowed client uses it too."""
    __slots__ = ("public", "secret")

    def __init__(self, public: bytes, secret: bytes) -> None:
        self.public, self.secret = public, secret

    @classmethod
    def from_info(cls, info: dict) -> CurveKeys | None:
        public, secret = info.get("curve_publickey"), info.get("curve_secretkey")
        if not public or not secret:
            return None
        return cls(_bytes(public), _bytes(secret))

    def serve(self, sock: zmq.Socket, domain: str = KERNEL_DOMAIN) -> None:
        """Make ``sock`` (before it binds) a CURVE server checked by ZAP."""
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = domain.encode()

    def connect_as_client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it connects) this kernel's CURVE client."""
        sock.curve_serverkey = self.public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """A started ZAP handler for ``context``: the kernel's own key for
        KERNEL_DOMAIN, any CURVE client for HB_DOMAIN."""
        from zmq.auth.thread import ThreadAuthenticator
        auth = ThreadAuthenticator(context)
        auth.start()
        allowed = self.public

        class Check:
            @staticmethod
            def callback(domain: str, key: bytes) -> bool:
                return domain == HB_DOMAIN or key == allowed

        auth.configure_curve_callback(KERNEL_DOMAIN, Check)
        auth.configure_curve_callback(HB_DOMAIN, Check)
        return auth


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def node_address() -> str:
    """This node's own address, to bind a kernel's TCP sockets to on a
    compute node (the relay's, the keeper's in a kernel's job): the address
    its hostname resolves to here, which is where the server, resolving the
    same name, connects. "0.0.0.0" (every address) when the name does not
    resolve, or resolves to a loopback address (Debian's ``127.0.1.1
    HOSTNAME`` line): nothing on another node could reach that."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "0.0.0.0"
    return "0.0.0.0" if ipaddress.ip_address(address).is_loopback else address


def secure_client(sock: zmq.Socket, info: dict, address: str) -> None:
    """Before connecting ``sock`` to ``address``: CURVE with the kernel's
    keys from connection info ``info`` when the address is TCP (a kernel's
    relay or keeper on a node); IPC needs nothing."""
    keys = CurveKeys.from_info(info)
    if address.startswith("tcp://") and keys is not None:
        keys.connect_as_client(sock)


# -------------------------------------------------------------- relay ---

#: channel -> (frontend socket type on TCP, backend type towards the kernel)
CHANNELS = {
    "shell_port": ("ROUTER", "DEALER"),
    "control_port": ("ROUTER", "DEALER"),
    "stdin_port": ("ROUTER", "DEALER"),
    "hb_port": ("ROUTER", "DEALER"),
    "iopub_port": ("XPUB", "XSUB"),
}


class Relay:
    """The kernel's channels on TCP with CURVE, forwarded to its IPC
    sockets, one proxy thread per channel."""

    def __init__(self, keys: CurveKeys, kernel_ipc: str, kernel_ports: dict[str, int],
                 ports: dict[str, int], bind_ip: str = "0.0.0.0"):
        import zmq
        self.context = zmq.Context()
        self.auth = keys.authenticator(self.context)
        # The kernel answers shell and stdin requests to one identity: our
        # backends for them (and control) must share it, as a client's do.
        identity = os.urandom(8).hex().encode()
        self.ports: dict[str, int] = {}
        self._pairs: list[tuple[zmq.Socket, zmq.Socket]] = []
        for channel, types in CHANNELS.items():
            front_type, back_type = (getattr(zmq, name) for name in types)
            front = self.context.socket(front_type)
            front.linger = 0
            if channel == "hb_port":
                front.maxmsgsize = MAX_PING
            keys.serve(front, HB_DOMAIN if channel == "hb_port" else KERNEL_DOMAIN)
            self.ports[channel] = _bind_tcp(front, bind_ip, ports.get(channel, 0))
            back = self.context.socket(back_type)
            back.linger = 0
            if back_type == zmq.DEALER:
                back.identity = identity
            back.connect(f"ipc://{kernel_ipc}-{kernel_ports[channel]}")
            self._pairs.append((front, back))
        self._threads = [threading.Thread(target=_proxy, args=pair, daemon=True)
                         for pair in self._pairs]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self.auth.stop()
        self.context.term()  # ends the proxies (ContextTerminated), closes their sockets


def _proxy(front: zmq.Socket, back: zmq.Socket) -> None:
    import zmq
    try:
        zmq.proxy(front, back)
    except zmq.ContextTerminated:
        pass
    finally:
        front.close()
        back.close()


def _bind_tcp(sock: zmq.Socket, ip: str, port: int) -> int:
    """Bind ``port`` if asked for and free (a restart keeps its ports),
    else one of the system's choosing."""
    import zmq
    if port:
        try:
            sock.bind(f"tcp://{ip}:{port}")
            return port
        except zmq.ZMQError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    return sock.bind_to_random_port(f"tcp://{ip}")


def _write_private(path: Path, data: dict) -> None:
    """Write ``path`` whole (renamed into place), mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


#: The IPC "ports" a kernel is given: names in its private directory, so
#: they are chosen here and need no hand-back (see ipc_bound).
IPC_PORTS = dict(zip(PORTS, range(1, 6)))


def socket_names(prefix: str, number: int) -> tuple[str, str]:
    """Kernel IPC socket ``number`` as jupyter_client names it (PREFIX-N),
    and as a kernel that formats endpoints like TCP ones names it
    (PREFIX:N; IRkernel does)."""
    return f"{prefix}-{number}", f"{prefix}:{number}"


def ipc_bound(prefix: str, ports: dict[str, int]) -> bool:
    """Whether the kernel has bound all its IPC sockets PREFIX-N (a path
    on this host). A kernel that bound PREFIX:N instead gets PREFIX-N as a
    symlink to it, where jupyter_client connects: in the kernel's private
    (0700) directory, which nobody else can write to."""
    for number in ports.values():
        dash, colon = (Path(name) for name in socket_names(prefix, number))
        if dash.is_socket():
            continue
        if not colon.is_socket():
            return False
        if not dash.is_symlink():
            dash.symlink_to(colon.name)
    return True


def clear_ipc(prefix: str, ports: dict[str, int]) -> None:
    """Remove a previous run's sockets (and links), so that only the new
    kernel's count as bound."""
    for number in ports.values():
        for name in socket_names(prefix, number):
            Path(name).unlink(missing_ok=True)


def _wait_kernel_sockets(prefix: str, kernel: subprocess.Popen,
                         timeout: float) -> bool:
    """Whether the kernel bound its sockets (False: it exited first, or took
    longer than ``timeout``)."""
    deadline = time.monotonic() + timeout
    while kernel.poll() is None and time.monotonic() < deadline:
        if ipc_bound(prefix, IPC_PORTS):
            return True
        time.sleep(0.02)  # a polling interval: nothing signals the bind
    return False


def run_relay(connection_file: Path, command: list[str], timeout: float = 600.0) -> int:
    """Run the kernel (``command``) behind a relay; its exit status."""
    requested = json.loads(connection_file.read_text())
    keys = CurveKeys.from_info(requested)
    if keys is None:
        print(f"chspawner relay: {connection_file} has no CURVE keys", file=sys.stderr)
        return 2
    # The kernel's sockets: node-local, private. The container sees our
    # TMPDIR at /tmp.
    tmp = os.environ.get("TMPDIR") or "/tmp"
    private = Path(tempfile.mkdtemp(prefix="chspawner-kernel-", dir=tmp))
    relay_file = connection_file.with_name("relay.json")
    relay_file.unlink(missing_ok=True)
    kernel = None
    try:
        host_ipc = ipc_prefix(private)
        inside_ipc = ipc_prefix(Path("/tmp") / private.name)
        # The kernel's view: IPC, ports chosen here (any kernel binds what
        # it is given; not every one writes back what it chose); no CURVE
        # (IPC in a private directory needs none, and its kernel may know none).
        for_kernel = {k: v for k, v in requested.items() if not k.startswith("curve_")}
        for_kernel.update(IPC_PORTS, transport="ipc", ip=inside_ipc)
        _write_private(connection_file, for_kernel)
        # Before anything imports zmq (the Relay, below): the kernel's start
        # is the long part, and runs meanwhile.
        kernel = subprocess.Popen(command)
        # scancel signals every process of the job: the kernel gets its own.
        signal.signal(signal.SIGTERM, lambda *_: kernel.terminate())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts go as messages
        if not _wait_kernel_sockets(host_ipc, kernel, timeout):
            return kernel.wait() if kernel.poll() is not None else _stop(kernel)
        kernel_ports = dict(IPC_PORTS)
        relay = Relay(keys, host_ipc, kernel_ports,
                      {p: int(requested.get(p) or 0) for p in PORTS}, node_address())
        relay.start()
        try:
            _write_private(relay_file, {"node": socket.gethostname(), "ports": relay.ports,
                                        "kernel_ipc": host_ipc,
                                        "kernel_ports": kernel_ports})
            return kernel.wait()
        finally:
            relay.close()
    except TransportError as e:
        print(f"chspawner relay: {e}", file=sys.stderr)
        return 2
    finally:
        if kernel is not None and kernel.poll() is None:
            _stop(kernel)
        shutil.rmtree(private, ignore_errors=True)


def _stop(kernel: subprocess.Popen) -> int:
    kernel.terminate()
    try:
        return kernel.wait(10)
    except subprocess.TimeoutExpired:
        kernel.kill()
        return kernel.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chspawner.provisioner.transport",
        description="Run a kernel on IPC behind a CURVE relay (inside a Slurm job).")
    parser.add_argument("--connection-file", type=Path, required=True,
                        help="the staged connection file (with the kernel's CURVE keys)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds the kernel gets to bind its sockets")
    parser.add_argument("command", nargs="+", help="the kernel's command (after --)")
    args = parser.parse_args(argv)
    try:
        return run_relay(args.connection_file, args.command, args.timeout)
    except (OSError, ValueError) as e:
        print(f"chspawner relay: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
