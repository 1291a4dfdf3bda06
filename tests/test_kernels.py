"""Kernels in images through the chspawner provisioner: real ipykernel in
the Debian test image, driven by jupyter_client as the unprivileged user."""
from __future__ import annotations

import json
import os
import socket
import textwrap

import pytest

from tests.harness.env import CHSPAWNER, VENV_BIN
from tests.harness.users import as_user
from tests.harness.wait import wait_until

# Runs as the test user: start a kernel by name through a KernelManager that
# uses the discovery, then do what a notebook user does, and report.
DRIVER = textwrap.dedent('''
    import json, os, sys, time
    from jupyter_client.manager import KernelManager
    from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager

    name, storage = sys.argv[1], sys.argv[2]
    ksm = ContainerKernelSpecManager(storage=storage)
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    report = {}
    def run(code, timeout=30):
        out = []
        msg = kc.execute_interactive(code, timeout=timeout,
            output_hook=lambda m: out.append(m["content"].get("text", "")))
        return msg["content"]["status"], "".join(out)
    try:
        km.start_kernel()
    except Exception as e:
        print(json.dumps({"start_error": str(e)})); sys.exit(0)
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
    report["pid"] = km.provisioner.pid
    report["ports"] = [km.shell_port, km.iopub_port, km.stdin_port, km.hb_port,
                       km.control_port]
    report["marker"] = run("print(open('/etc/chspawner-test-image').read().strip())")
    report["kernel_pid"] = run("import os; print(os.getpid())")[1].strip()
    run("x = 42")
    # Interrupt a long sleep: SIGINT must reach the kernel itself.
    kc.execute("import time; print('sleeping', flush=True); time.sleep(60)")
    while "sleeping" not in kc.get_iopub_msg(timeout=20)["content"].get("text", ""):
        pass
    start = time.monotonic()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=20)
    report["interrupt"] = [reply["content"]["status"], reply["content"].get("ename"),
                           round(time.monotonic() - start, 2)]
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=60)
    report["after_restart"] = run("print('x' in globals())")
    report["restart_ports"] = [km.shell_port, km.iopub_port, km.stdin_port,
                               km.hb_port, km.control_port]
    report["restart_pid"] = km.provisioner.pid
    kc.stop_channels()
    km.shutdown_kernel(now=False)
    report["alive_after_shutdown"] = [p for p in (report["pid"], report["restart_pid"])
                                      if os.path.exists(f"/proc/{p}")]
    print(json.dumps(report))
''')


@pytest.fixture
def drive(user, user_dir, kernel_store):
    """Run the driver as the test user for a kernelspec name."""
    script = user_dir / "driver.py"
    script.write_text(DRIVER)
    os.chmod(script, 0o644)

    def run(kernel_name: str) -> dict:
        result = as_user(user.pw_name, "env", f"TMPDIR={user_dir}",
                         str(VENV_BIN / "python"), str(script), kernel_name,
                         kernel_store, check=False, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])
    return run


def test_discovery_lists_image_kernels_beside_native(user, kernel_store):
    out = as_user(user.pw_name, str(CHSPAWNER), "kernel", "list", "-s", kernel_store).stdout
    assert "chspawner-deb--python3" in out
    assert "Python 3 (ipykernel) — image deb" in out
    assert "\npython3 " in out  # the native kernel stays listed
    assert "nopython" not in out  # busybox carries no kernelspec


def test_discovered_kernels_run_from_the_store_they_were_found_in(kernel_store):
    """Not from the default store of whoever runs them (a server started with
    the admin's store must not look in the user's own)."""
    from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager
    spec = ContainerKernelSpecManager(storage=kernel_store).get_kernel_spec(
        "chspawner-deb--python3")
    config = spec.metadata["kernel_provisioner"]["config"]
    assert config["image"] == "deb" and config["storage"] == kernel_store


def test_kernel_in_image_lifecycle(drive):
    report = drive("chspawner-deb--python3")
    assert report["marker"] == ["ok", "chspawner test image: Debian bookworm\n"]
    assert all(report["ports"]) and len(set(report["ports"])) == 5
    # The process jupyter_client holds is the kernel itself (the runtime execs).
    assert report["kernel_pid"] == str(report["pid"])
    assert report["interrupt"][:2] == ["error", "KeyboardInterrupt"]
    assert report["interrupt"][2] < 10
    assert report["after_restart"] == ["ok", "False\n"]  # state cleared
    assert report["restart_ports"] == report["ports"]  # clients keep their ports
    assert report["restart_pid"] != report["pid"]
    assert report["alive_after_shutdown"] == []


START = textwrap.dedent('''
    import sys, time
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name=sys.argv[1])
    start = time.monotonic()
    try:
        km.start_kernel()
        print("0 started")
    except Exception as e:
        print(f"{time.monotonic() - start:.1f} {e}")
''')


@pytest.mark.parametrize("case, words", [
    ("no-image", ["image not found: gone"]),
    ("no-python", ["nopython", "python3", "not found"]),
    ("no-ipykernel", ["exited with status 1", "is ipykernel installed"]),
])
def test_kernel_that_cannot_start_fails_fast(user, user_dir, kernel_store, case, words):
    """A clear message at once, not a timeout."""
    prefix = user_dir / "prefix"
    image = {"no-image": "deb", "no-python": "nopython", "no-ipykernel": "deb"}[case]
    as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s", kernel_store,
            "--prefix", str(prefix), "--name", "k", image)
    spec_path = prefix / "share/jupyter/kernels/k/kernel.json"
    spec = json.loads(spec_path.read_text())
    if case == "no-image":
        spec["metadata"]["kernel_provisioner"]["config"]["image"] = "gone"
    if case == "no-ipykernel":  # a Python that lacks the kernel's module
        spec["argv"] = ["/usr/bin/python3", "-m", "no_such_kernel", "-f",
                        "{connection_file}"]
    spec_path.write_text(json.dumps(spec))
    script = user_dir / "start.py"
    script.write_text(START)
    os.chmod(script, 0o644)
    result = as_user(user.pw_name, "env", f"JUPYTER_PATH={prefix}/share/jupyter",
                     f"TMPDIR={user_dir}", str(VENV_BIN / "python"), str(script), "k",
                     timeout=120)
    seconds, message = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert float(seconds) < 10, message
    for word in words:
        assert word in message, message


def test_kernel_install_writes_a_provisioned_kernelspec(user, user_dir, kernel_store):
    prefix = user_dir / "prefix"
    out = as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s", kernel_store,
                  "--prefix", str(prefix), "--bind", "/scratch", "--display-name",
                  "Debian", "deb").stdout.strip()
    spec = json.loads((prefix / "share/jupyter/kernels/chspawner-deb--python3"
                       / "kernel.json").read_text())
    assert out.endswith("chspawner-deb--python3")
    assert spec["display_name"] == "Debian"
    assert spec["argv"][-2:] == ["-f", "{connection_file}"]
    provisioner = spec["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == "chspawner"
    assert provisioner["config"]["image"] == "deb"
    assert provisioner["config"]["binds"] == ["/scratch"]
    # The home is bound unless refused: a notebook's kernel sees its files.
    assert provisioner["config"]["home"] is True
    as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s", kernel_store,
            "--prefix", str(prefix), "--no-home", "--name", "nohome", "deb")
    spec = json.loads((prefix / "share/jupyter/kernels/nohome/kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["home"] is False
    result = as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s",
                     kernel_store, "missing-image", check=False)
    assert result.returncode == 1 and "no image missing-image" in result.stderr


# -------------------------------------------------- compute-node kernels ----

def drive_node_kernel(user, user_dir, kernel_store, slurm, name: str, install: list[str],
                      driver: str, timeout: float = 600, spec_config: dict | None = None,
                      argv: list[str] | None = None):
    """Install kernelspec ``name`` with ``install`` options (plus
    ``spec_config`` in its provisioner config, and ``argv`` instead of its
    own), then run the Python ``driver`` (its argv[1]: the kernelspec's
    name) as the test user against the test cluster; its completed process."""
    prefix = user_dir / "prefix"
    as_user(user.pw_name, str(CHSPAWNER), "kernel", "install", "-s", kernel_store,
            "--prefix", str(prefix), *install, "--name", name, "deb")
    if spec_config or argv:
        spec_file = prefix / "share/jupyter/kernels" / name / "kernel.json"
        spec = json.loads(spec_file.read_text())
        spec["metadata"]["kernel_provisioner"]["config"].update(spec_config or {})
        spec["argv"] = argv or spec["argv"]
        spec_file.write_text(json.dumps(spec))
    script = user_dir / f"{name}_driver.py"
    script.write_text(driver)
    os.chmod(script, 0o644)
    return as_user(user.pw_name, "env", f"JUPYTER_PATH={prefix}/share/jupyter",
                   *[f"{k}={v}" for k, v in slurm.env.items()],
                   str(VENV_BIN / "python"), str(script), name, check=False,
                   timeout=timeout)


SRUN_DRIVER = textwrap.dedent('''
    import json, os, subprocess, sys, time
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name=sys.argv[1])
    km.start_kernel()
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
    report = {"ip": km.ip}
    def run(code):
        out = []
        msg = kc.execute_interactive(code, timeout=60,
            output_hook=lambda m: out.append(m["content"].get("text", "")))
        return msg["content"]["status"], "".join(out)
    report["marker"] = run("print(open('/etc/chspawner-test-image').read().strip())")
    report["job"] = run("import os; print(os.environ.get('SLURM_JOB_ID'))")[1].strip()
    # stdin: the kernel asks the client that executed (through the relay).
    msg_id = kc.execute("print('got', input('?'))", allow_stdin=True)
    kc.input(kc.get_stdin_msg(timeout=30)["content"]["prompt"] + "answer")
    out = []
    while True:
        m = kc.get_iopub_msg(timeout=30)
        if m["parent_header"].get("msg_id") == msg_id:
            out.append(m["content"].get("text", ""))
            if m["content"].get("execution_state") == "idle":
                break
    report["stdin"] = "".join(out)
    while kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
        pass  # (its reply: not to be taken for the next one's)
    kc.execute("import time; print('sleeping', flush=True); time.sleep(60)")
    while "sleeping" not in kc.get_iopub_msg(timeout=30)["content"].get("text", ""):
        pass
    km.interrupt_kernel()
    report["interrupt"] = kc.get_shell_msg(timeout=30)["content"].get("ename")
    run("x = 1")
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=120)
    report["after_restart"] = run("print('x' in globals())")
    # A job that dies under the kernel: the manager notices promptly.
    job = run("import os; print(os.environ['SLURM_JOB_ID'])")[1].strip()
    subprocess.run(["scancel", job], check=True)
    start = time.monotonic()
    while km.is_alive() and time.monotonic() - start < 60:
        time.sleep(0.1)
    report["dead_after"] = round(time.monotonic() - start, 1)
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    print(json.dumps(report))
''')


@pytest.mark.parametrize("launcher", ["srun", "sbatch"])
def test_kernel_on_a_compute_node(user, user_dir, kernel_store, slurm, launcher):
    """A job step of srun, or a batch job of its own: the same kernel."""
    result = drive_node_kernel(
        user, user_dir, kernel_store, slurm, "onnode",
        ["--launcher", launcher, f"--{launcher}-arg=--partition={slurm.partition}"],
        SRUN_DRIVER)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["marker"] == ["ok", "chspawner test image: Debian bookworm\n"]
    assert report["job"].isdigit()                 # it ran as a Slurm job
    assert report["stdin"] == "got ?answer\n"
    # Reached at the node's address (on this one-node cluster, this host's).
    assert report["ip"] == socket.gethostbyname(slurm.node)
    assert report["interrupt"] == "KeyboardInterrupt"
    assert report["after_restart"] == ["ok", "False\n"]
    assert report["dead_after"] < 15
    # Its job ends with it (a job just cancelled may be listed a moment
    # longer, COMPLETING, while Slurm tidies up after it).
    wait_until(lambda: "chspawner-kernel" not in slurm.run(
        "squeue", "-h", "-u", user.pw_name, "-o", "%i %j").stdout,
        "the kernel's job to leave the queue", timeout=30)


START_ONLY = textwrap.dedent('''
    import sys
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name=sys.argv[1])
    try:
        km.start_kernel()
    except Exception as e:
        print(f"failed: {e}")
    else:
        km.shutdown_kernel(now=True)
        print("started")
''')


@pytest.mark.parametrize("case", ["no such partition", "queued past launch_timeout"])
def test_a_kernel_job_that_cannot_start_fails_and_leaves_no_job(
        request, user, user_dir, kernel_store, slurm, case):
    partition = "nosuch" if case == "no such partition" else slurm.partition
    if case != "no such partition":
        request.getfixturevalue("drained")  # the job waits in the queue
    result = drive_node_kernel(
        user, user_dir, kernel_store, slurm, "queued",
        ["--launcher", "sbatch", f"--sbatch-arg=--partition={partition}"], START_ONLY,
        timeout=120, spec_config={"launch_timeout": 3})
    last = result.stdout.strip().splitlines()[-1]
    if case == "no such partition":
        assert last.startswith("failed: can't submit the kernel's job: sbatch: error: "), last
        assert "Invalid partition name" in last, last
    else:
        assert last == ("failed: kernel in image deb did not bind its ports within 3 s "
                        "(provisioner config 'launch_timeout')"), last
    assert not slurm.jobs(user.pw_name, "chspawner-kernel-")


def test_a_kernel_job_that_ends_first_shows_its_log_from_the_log_dir(
        user, user_dir, kernel_store, slurm):
    """**fix**: the job's output goes to job_log_dir (the user's log
    directory, from the spawner), and the start error shows its end."""
    logs = user_dir / "logs"
    result = drive_node_kernel(
        user, user_dir, kernel_store, slurm, "dies",
        ["--launcher", "sbatch", f"--sbatch-arg=--partition={slurm.partition}"], START_ONLY,
        timeout=300, spec_config={"job_log_dir": str(logs)},
        argv=["/usr/bin/python3", "-m", "no_such_kernel", "-f", "{connection_file}"])
    last = result.stdout.strip().splitlines()[-1]
    [log] = logs.glob("chspawner-kernel-*.log")
    assert last.startswith("failed: the kernel's Slurm job "), last
    assert "ended before the kernel was ready: " in last, last
    assert "No module named no_such_kernel" in last, last
    assert last.endswith(f"(its output: {log})"), last
    assert "No module named no_such_kernel" in log.read_text()
    assert not slurm.jobs(user.pw_name, "chspawner-kernel-")


REATTACH = textwrap.dedent('''
    import asyncio, json, signal, sys
    from jupyter_client.manager import KernelManager
    from chspawner.provisioner.kernelspecs import ContainerKernelSpecManager
    from chspawner.provisioner import ContainerProvisioner

    km = KernelManager(kernel_name=sys.argv[1],
                       kernel_spec_manager=ContainerKernelSpecManager(storage=sys.argv[2]))
    km.start_kernel()
    info = asyncio.run(km.provisioner.get_provisioner_info())
    json.dumps(info)  # it must persist as JSON
    # What a new server process would do: a fresh provisioner from the record.
    adopted = ContainerProvisioner(kernel_id=km.kernel_id, kernel_spec=km.kernel_spec,
                                   parent=km)
    asyncio.run(adopted.load_provisioner_info(info))
    report = {"has_process": adopted.has_process,
              "alive": asyncio.run(adopted.poll()) is None}
    asyncio.run(adopted.send_signal(signal.SIGKILL))
    asyncio.run(asyncio.wait_for(adopted.wait(), 30))
    report["alive_after_kill"] = asyncio.run(adopted.poll()) is None
    report["real_exit"] = km.provisioner.process.wait(timeout=30)
    asyncio.run(km.provisioner.cleanup())
    print(json.dumps(report))
''')


def test_provisioner_info_lets_a_new_process_take_the_kernel_over(user, user_dir,
                                                                   kernel_store):
    script = user_dir / "reattach.py"
    script.write_text(REATTACH)
    os.chmod(script, 0o644)
    result = as_user(user.pw_name, "env", f"TMPDIR={user_dir}", str(VENV_BIN / "python"),
                     str(script), "chspawner-deb--python3", kernel_store, check=False,
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"has_process": True, "alive": True, "alive_after_kill": False,
                      "real_exit": -9}


def test_srun_kernel_in_an_existing_allocation(user, user_dir, kernel_store, slurm):
    """jobid: the kernel is a step of the user's own job, which it leaves
    running when it stops."""
    job = slurm.submit("--wrap=sleep 600", f"--partition={slurm.partition}",
                       user=user.pw_name)
    try:
        slurm.wait_job(job, "RUNNING")
        result = drive_node_kernel(
            user, user_dir, kernel_store, slurm, "instep",
            ["--launcher", "srun", f"--jobid={job}"], textwrap.dedent('''
            import sys
            from jupyter_client.manager import KernelManager
            km = KernelManager(kernel_name=sys.argv[1])
            km.start_kernel()
            kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
            out = []
            kc.execute_interactive("import os; print(os.environ['SLURM_JOB_ID'])",
                output_hook=lambda m: out.append(m["content"].get("text", "")))
            kc.stop_channels()
            km.shutdown_kernel()
            print("".join(out).strip())
        '''), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == str(job)
        assert slurm.job_state(job) == "RUNNING"
    finally:
        slurm.run("scancel", str(job))
