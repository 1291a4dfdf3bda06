"""Any Jupyter kernel in an image: Debian's IRkernel, which neither writes
the ports it binds back into its connection file (as ipykernel does) nor
names IPC endpoints the way jupyter_client does (PREFIX:PORT, not
PREFIX-PORT). Real parts: the ``irkernel`` test image (scripts/images/
irkernel.sh), jupyter_client as the unprivileged user, and the
jupyter_kernel_test conformance suite.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import textwrap
from pathlib import Path

import pytest

from chspawner.images.trees import remove_tree
from tests.harness.env import CHSPAWNER, VENV_BIN
from tests.harness.images import image_path, tarball
from tests.harness.users import as_user

KERNEL = "chspawner-irk--ir"


@pytest.fixture(scope="module")
def ir_store(user):
    """The test user's store with the IRkernel image as ``irk``."""
    work = Path(tempfile.mkdtemp(prefix="chspawner-irk-", dir="/tmp"))
    os.chmod(work, 0o755)
    store = work / "store"
    store.mkdir()
    os.chown(store, user.pw_uid, user.pw_gid)
    src = tarball(image_path("irkernel"), work / "irk.tar")
    as_user(user.pw_name, str(CHSPAWNER), "import", "-q", "-s", str(store), str(src), "irk")
    src.unlink()
    yield str(store)
    remove_tree(work)


DRIVER = textwrap.dedent('''
    import json, sys, time
    from jupyter_client.manager import KernelManager
    from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager

    ksm = ContainerKernelSpecManager(storage=sys.argv[2],
                                     provisioner_config=json.loads(sys.argv[3]))
    km = KernelManager(kernel_name=sys.argv[1], kernel_spec_manager=ksm)
    def run(code):
        out = []
        msg = kc.execute_interactive(code, timeout=60,
            output_hook=lambda m: out.append(m["content"].get("text", "")))
        return msg["content"]["status"], "".join(out)
    began = time.monotonic()
    km.start_kernel()
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
    report = {"ready_s": time.monotonic() - began, "transport": km.transport,
              "ip": km.ip}
    report["answer"] = run("cat(6 * 7)")
    report["image"] = run("cat(readLines('/etc/chspawner-test-image'))")
    report["ports"] = [km.shell_port, km.iopub_port, km.stdin_port, km.hb_port,
                       km.control_port]
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=120)
    report["after_restart"] = run("cat(exists('x'))")
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    print(json.dumps(report))
''')


@pytest.mark.parametrize("launcher", ["local", "srun", "sbatch"])
def test_irkernel_runs_in_an_image(request, user, user_dir, ir_store, launcher):
    """Here (IPC), and on a compute node (IPC on the node, behind the
    relay, which chooses the kernel's ports there)."""
    config, env = {"launcher": launcher}, []
    if launcher != "local":
        slurm = request.getfixturevalue("slurm")
        config[f"{launcher}_args"] = [f"--partition={slurm.partition}"]
        env = [f"{k}={v}" for k, v in slurm.env.items()]
    script = user_dir / "driver.py"
    script.write_text(DRIVER)
    os.chmod(script, 0o644)
    result = as_user(user.pw_name, "env", f"TMPDIR={user_dir}", *env,
                     str(VENV_BIN / "python"), str(script), KERNEL, ir_store,
                     json.dumps(config), check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Still nothing in the clear on TCP: IPC here, CURVE from a node.
    assert report["transport"] == ("ipc" if launcher == "local" else "tcp")
    if launcher != "local":
        assert report["ip"] == socket.gethostbyname(slurm.node)
    assert report["answer"] == ["ok", "42"]
    assert report["image"] == ["ok", "chspawner test image: Debian bookworm with IRkernel"]
    assert report["after_restart"] == ["ok", "FALSE"]


CONFORMANCE = textwrap.dedent("""
    import sys, unittest
    import jupyter_kernel_test
    from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager
    from jupyter_client.manager import KernelManager

    STORE = sys.argv.pop(1)

    class IRkernelInImage(jupyter_kernel_test.KernelTests):
        kernel_name = "KERNEL"
        language_name = "R"
        file_extension = ".r"

        @classmethod
        def setUpClass(cls):
            cls.km = KernelManager(kernel_name=cls.kernel_name,
                                   kernel_spec_manager=ContainerKernelSpecManager(storage=STORE))
            cls.km.start_kernel()
            cls.kc = cls.km.client()
            cls.kc.start_channels()
            cls.kc.wait_for_ready(timeout=120)

        code_hello_world = "cat('hello, world')"
        completion_samples = [{"text": "zi", "matches": {"zip"}}]
        complete_code_samples = ["1", "print('hello, world')", "f <- function(x) {x*2}"]
        incomplete_code_samples = ["print('hello", "f <- function(x) {x"]
        # IRkernel shows a value as display_data (text/plain and richer), not
        # as an execute_result.
        code_display_data = [{"code": "1+2+3", "mime": "text/plain"}]
        code_generate_error = "stop('oops')"
        code_inspect_sample = "print"

    if __name__ == "__main__":
        unittest.main()
""").replace("KERNEL", KERNEL)


def test_irkernel_conformance(user, user_dir, ir_store):
    script = user_dir / "conformance.py"
    script.write_text(CONFORMANCE)
    os.chmod(script, 0o644)
    result = as_user(user.pw_name, "env", f"TMPDIR={user_dir}", str(VENV_BIN / "python"),
                     str(script), ir_store, "-v", check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stderr.splitlines()[-1]
