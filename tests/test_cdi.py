"""GPUs (and other devices) through CDI: ``chspawner run --device`` applies
spec files the way NVIDIA's toolkit writes them, unprivileged, to a
read-only image: device nodes bound, the spec's host libraries and
binaries bound read-only, its environment set, its library cache hook done
in the container; in a Slurm job, only the job's own GPUs.

The specs here are written by the tests: device nodes every machine has
(/dev/null, /dev/zero standing in for GPUs), a host library the image
lacks standing in for the driver's, a script standing in for nvidia-smi.
Debian 12's ch-run (0.31) has no CDI (Charliecloud added it in 0.38), so
these run on the builtin backend."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from chspawner.runtime.spec import RunSpec, to_argv
from tests.harness.env import AS_USER, CHSPAWNER
from tests.harness.images import squashed
from tests.harness.procs import live_named
from tests.harness.wait import read_line, wait_until

KIND = "example.com/gpu"

# What nvidia-ctk's specs carry, with stand-ins: per-device nodes and
# environment; spec-wide a library, a binary, the ldcache hook, a link,
# a hook that is not needed without privilege.
STANDIN_LIB_DIR = "/opt/standin/lib"


def host_library() -> Path:
    """A real shared library of the host that the test image lacks (the
    FUSE library squashfuse brings): the driver library's stand-in."""
    found = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libfuse3.so.3.*"))
    assert found, "libfuse3 missing: scripts/setup-system.sh installs squashfuse"
    return Path(found[0])


def write_spec(where: Path, name: str = "standin.yaml", kind: str = KIND,
               extra_hooks: list | None = None, prefix: str = "STANDIN_GPU") -> Path:
    """A spec as ``nvidia-ctk cdi generate`` shapes one, in YAML or JSON
    (by ``name``'s suffix), with its host files under ``where``/host."""
    host = where / "host"
    (host / "bin").mkdir(parents=True, exist_ok=True)
    library = host / host_library().name
    shutil.copy(host_library(), library)
    smi = host / "bin" / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "standin-smi $*"\n')
    smi.chmod(0o755)
    spec = {
        "cdiVersion": "0.6.0",
        "kind": kind,
        "devices": [
            {"name": "0", "containerEdits": {
                "deviceNodes": [{"path": "/dev/null"}], "env": [f"{prefix}0=yes"]}},
            # The container's /dev/full is the host's /dev/zero: a node
            # bound at a path of its own.
            {"name": "1", "containerEdits": {
                "deviceNodes": [{"path": "/dev/full", "hostPath": "/dev/zero"}],
                "env": [f"{prefix}1=yes"]}},
            {"name": "all", "containerEdits": {
                "deviceNodes": [{"path": "/dev/null"},
                                {"path": "/dev/full", "hostPath": "/dev/zero"}]}},
        ],
        "containerEdits": {
            "env": ["STANDIN_VISIBLE_DEVICES=void", "STANDIN_LITERAL=$HOME:x"],
            "mounts": [
                {"hostPath": str(library), "containerPath": f"{STANDIN_LIB_DIR}/{library.name}",
                 "options": ["ro", "nosuid", "nodev", "bind"]},
                {"hostPath": str(smi), "containerPath": "/usr/bin/nvidia-smi",
                 "options": ["ro", "nosuid", "nodev", "bind"]},
            ],
            "hooks": [
                {"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk",
                 "args": ["nvidia-ctk", "hook", "update-ldcache", "--folder", STANDIN_LIB_DIR]},
                {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
                 "args": ["nvidia-cdi-hook", "create-symlinks", "--link",
                          "../../bin/nvidia-smi::/usr/local/bin/standin-smi"]},
                {"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk",
                 "args": ["nvidia-ctk", "hook", "chmod", "--mode", "755", "--path", "/dev/dri"]},
                *(extra_hooks or []),
            ],
        },
    }
    specs = where / "specs"
    specs.mkdir(exist_ok=True)
    path = specs / name
    if name.endswith(".json"):
        path.write_text(json.dumps(spec, indent=1))
    else:
        import yaml
        path.write_text(yaml.safe_dump(spec))
    for p in (where, host, host / "bin", specs, path, library):
        p.chmod(p.stat().st_mode | 0o755 if p.is_dir() else 0o644)
    return path


@pytest.fixture
def cdi(user, user_dir) -> Path:
    """A spec directory the test user reads (as a center's /etc/cdi)."""
    return write_spec(user_dir).parent


# Inside the container: the devices, the files, the cache, the image.
PROBE = f"""
env | grep ^STANDIN_ | sort
stat -c 'full %t,%T' /dev/full
nvidia-smi -L
standin-smi link
/sbin/ldconfig -p | grep -c '{STANDIN_LIB_DIR}/' || true
python3 -c 'import ctypes, os; ctypes.CDLL("libfuse3.so.3"); \\
print("loaded", "{STANDIN_LIB_DIR}/" in open("/proc/self/maps").read())'
grep -o ' {STANDIN_LIB_DIR}/libfuse3[^ ]* ro,' /proc/self/mountinfo
grep -o ' /usr/bin/nvidia-smi ro,' /proc/self/mountinfo
touch /usr/bin/new 2>&1 | grep -o 'Read-only file system' | head -1
stat -c 'usr %U' /usr
"""


@pytest.mark.parametrize("form", ["yaml", "json"])
@pytest.mark.parametrize("image_kind", ["directory", "squashfs"])
def test_a_device_kind_in_a_read_only_image(builtin, user, user_dir, bookworm, form,
                                            image_kind):
    """Every device of the kind: its nodes (one bound at its own path), the
    spec's library and binary bound read-only where the image has neither,
    the library found through the image's own rebuilt cache, the spec's
    link made, its environment set literally; the image itself untouched
    and still read-only, its directories still its own."""
    specs = write_spec(user_dir, f"standin.{form}").parent
    image = str(squashed("bookworm") if image_kind == "squashfs" else bookworm)
    result = builtin.run(f"--cdi-dirs={specs}", f"--device={KIND}", image, "--",
                         "sh", "-c", PROBE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == ["STANDIN_GPU0=yes", "STANDIN_GPU1=yes", "STANDIN_LITERAL=$HOME:x",
                         "STANDIN_VISIBLE_DEVICES=void"]
    assert lines[4:] == ["full 1,5",            # /dev/zero's numbers at /dev/full
                         "standin-smi -L", "standin-smi link",
                         "1", "loaded True",
                         f" {STANDIN_LIB_DIR}/{host_library().name} ro,",  # bound read-only
                         " /usr/bin/nvidia-smi ro,",
                         "Read-only file system",  # the image
                         "usr nobody"], result.stdout
    # Nothing said for what was done; chmod needs no privilege: not a word.
    assert result.stderr == ""
    if image_kind == "directory":
        assert not (bookworm / "opt" / "standin").exists()
        assert not (bookworm / "usr" / "bin" / "nvidia-smi").exists()


def test_one_device_by_name_and_the_order_of_environment_options(builtin, cdi, bookworm):
    """``vendor/class=NAME`` is that device alone (with the spec's own
    edits); its environment applies where the option stands among
    --set-env and --unset-env."""
    out = builtin.ok(f"--cdi-dirs={cdi}", "--set-env=STANDIN_GPU0=early",
                     f"--device={KIND}=1", "--unset-env=STANDIN_VISIBLE_DEVICES",
                     str(bookworm), "--", "sh", "-c",
                     "env | grep ^STANDIN_ | sort; stat -c '%t,%T' /dev/full")
    assert out.splitlines() == ["STANDIN_GPU0=early", "STANDIN_GPU1=yes",
                                "STANDIN_LITERAL=$HOME:x", "1,5"]


def test_a_spec_file_by_path_and_write_fake(builtin, user_dir, bookworm):
    """A spec file given by path (all its devices), with -W: the devices'
    layer joins the writable overlay."""
    spec = write_spec(user_dir, "by-path.json")
    out = builtin.ok("-W", f"--device={spec}", str(bookworm), "--", "sh", "-c",
                     "nvidia-smi; env | grep -c ^STANDIN_GPU; "
                     "grep ' / / ' /proc/self/mountinfo | grep -c 'layer,upperdir='")
    assert out.splitlines() == ["standin-smi ", "2", "1"]


def test_the_users_own_spec_directory(builtin, user, user_dir, bookworm):
    """Without --cdi-dirs or $CH_RUN_CDI_DIRS, specs are also read from the
    user's ~/.config/cdi ($XDG_CONFIG_HOME/cdi), beside /etc/cdi and
    /var/run/cdi."""
    config = user_dir / "config"
    config.mkdir()
    config.chmod(0o755)
    write_spec(user_dir, "mine.yaml")
    shutil.move(str(user_dir / "specs"), str(config / "cdi"))
    out = builtin.ok(f"--device={KIND}=0", str(bookworm), "--", "sh", "-c",
                     "env | grep ^STANDIN_GPU", env={"XDG_CONFIG_HOME": str(config)})
    assert out.splitlines() == ["STANDIN_GPU0=yes"]


@pytest.mark.parametrize("job_env, asked, expected", [
    ({"SLURM_JOB_GPUS": "1"}, KIND, ["STANDIN_GPU1=yes"]),
    ({"SLURM_JOB_GPUS": "0,1", "SLURM_STEP_GPUS": "0"}, f"{KIND}=all", ["STANDIN_GPU0=yes"]),
])
def test_in_a_slurm_job_only_its_own_gpus(builtin, cdi, bookworm, job_env, asked, expected):
    """In a Slurm job (as Slurm sets its environment) a GPU kind, or its
    "all", is the job's (or step's) own GPUs, by index."""
    out = builtin.ok(f"--cdi-dirs={cdi}", f"--device={asked}", str(bookworm), "--",
                     "sh", "-c", "env | grep ^STANDIN_GPU",
                     env={"SLURM_JOB_ID": "7", **job_env})
    assert out.splitlines() == expected


@pytest.mark.parametrize("job_env, asked, message", [
    ({"SLURM_JOB_GPUS": "1"}, f"{KIND}=0", "not this Slurm job's GPU (the job has: 1)"),
    ({}, KIND, "this Slurm job has no GPUs"),
    ({"SLURM_JOB_GPUS": "5"}, KIND, "is named by one of this Slurm job's GPUs (5)"),
])
def test_a_gpu_outside_the_job_is_refused(builtin, cdi, bookworm, job_env, asked, message):
    result = builtin.run(f"--cdi-dirs={cdi}", f"--device={asked}", str(bookworm), "--",
                         "true", env={"SLURM_JOB_ID": "7", **job_env})
    assert result.returncode == 31
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_devices_takes_every_device_found(builtin, user_dir, bookworm):
    specs = write_spec(user_dir).parent
    write_spec(user_dir, "other.json", kind="example.org/fpga", prefix="STANDIN_FPGA")
    probe = "env | grep -E '^STANDIN_(GPU|FPGA)' | sort"
    out = builtin.ok(f"--cdi-dirs={specs}", "-d", str(bookworm), "--", "sh", "-c", probe)
    assert out.split() == ["STANDIN_FPGA0=yes", "STANDIN_FPGA1=yes",
                           "STANDIN_GPU0=yes", "STANDIN_GPU1=yes"]
    # In a job without GPUs the GPU kind is left out, the rest is given.
    out = builtin.ok(f"--cdi-dirs={specs}", "--devices", str(bookworm), "--", "sh", "-c",
                     probe, env={"SLURM_JOB_ID": "7"})
    assert out.split() == ["STANDIN_FPGA0=yes", "STANDIN_FPGA1=yes"]


@pytest.mark.parametrize("args, code, message", [
    ([f"--device={KIND}=9"], 31, "unknown device; example.com/gpu has: 0, 1, all"),
    (["--device=nvidia.com/gpu"], 31, "no CDI spec for nvidia.com/gpu in"),
    (["--device=gpu"], 31, "kind must be vendor.com/class"),
    (["--device=./missing.yaml"], 31, "can't read CDI spec ./missing.yaml"),
    (["-w", f"--device={KIND}"], 64, "--device can't be used with --write"),
])
def test_bad_requests(builtin, cdi, bookworm, args, code, message):
    result = builtin.run(f"--cdi-dirs={cdi}", *args, str(bookworm), "--", "true")
    assert result.returncode == code
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def spec_with(user_dir: Path, edits: dict, name: str = "bad.json") -> Path:
    path = user_dir / name
    path.write_text(json.dumps({"cdiVersion": "0.6.0", "kind": "example.com/bad",
                                "devices": [{"name": "x", "containerEdits": edits}]}))
    path.chmod(0o644)
    return path


@pytest.mark.parametrize("edits, message", [
    ({"mounts": [{"hostPath": "/nonexistent/libcuda.so", "containerPath": "/usr/lib/x.so"}]},
     "host path /nonexistent/libcuda.so not found"),
    ({"mounts": [{"hostPath": "/tmp", "containerPath": "/scratch", "type": "tmpfs"}]},
     "tmpfs mount at /scratch not supported"),
    ({"deviceNodes": [{"path": "/dev/nvidia9"}]}, "device node /dev/nvidia9"),
    ({"deviceNodes": [{"path": "/dev/standin", "hostPath": "/dev/zero"}]},
     "the container's /dev is the host's, which has no /dev/standin"),
    ({"deviceNodes": [{"path": "/etc/hostname"}]}, "/etc/hostname is not a device node"),
    ({"env": ["NOEQUALS"]}, "bad env entry 'NOEQUALS'"),
])
def test_a_spec_that_cant_be_applied(builtin, user, user_dir, bookworm, edits, message):
    """One line, exit 31."""
    spec = spec_with(user_dir, edits)
    result = builtin.run(f"--device={spec}", str(bookworm), "--", "true")
    assert result.returncode == 31
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_broken_spec_in_a_directory_is_skipped_with_a_warning(builtin, cdi, bookworm):
    (cdi / "broken.yaml").write_text("cdiVersion: [\n")
    (cdi / "broken.yaml").chmod(0o644)
    result = builtin.run(f"--cdi-dirs={cdi}", f"--device={KIND}=0", str(bookworm), "--",
                         "sh", "-c", "echo $STANDIN_GPU0")
    assert result.returncode == 0 and result.stdout == "yes\n"
    assert result.stderr.count("\n") == 1
    assert "warning: CDI spec" in result.stderr and "broken.yaml: not YAML" in result.stderr


def test_an_unknown_hook_is_named_not_run(builtin, user_dir, bookworm):
    marker = user_dir / "ran"
    spec = write_spec(user_dir, extra_hooks=[
        {"hookName": "createContainer", "path": "/bin/touch", "args": ["touch", str(marker)]}])
    result = builtin.run(f"--device={spec}", str(bookworm), "--", "true")
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "/bin/touch" in result.stderr
    assert not marker.exists()


def test_an_image_without_ldconfig(builtin, cdi, busybox):
    """The ldcache hook needs the image's own ldconfig: busybox has none."""
    result = builtin.run(f"--cdi-dirs={cdi}", f"--device={KIND}=0", str(busybox), "--", "true")
    assert result.returncode == 31
    assert result.stderr.count("\n") == 1 and "has no ldconfig" in result.stderr


def test_the_runspec_path(user, cdi, bookworm):
    """What the spawners and the provisioner start: RunSpec's devices, by
    the launcher script (python -I -S: PyYAML from the site packages)."""
    argv = to_argv(RunSpec(image=str(bookworm), command=["sh", "-c", "echo $STANDIN_GPU1"],
                           devices=[f"{KIND}=1"]))
    result = subprocess.run([str(AS_USER), user.pw_name, "env", f"CH_RUN_CDI_DIRS={cdi}",
                             *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "yes\n"


def test_squashfs_with_a_device_leaves_nothing(builtin, user, user_dir, cdi):
    image = squashed("bookworm")
    assert builtin.ok(f"--cdi-dirs={cdi}", f"--device={KIND}", str(image), "--",
                      "nvidia-smi").strip() == "standin-smi"
    wait_until(lambda: not live_named(user.pw_uid, "squashfuse_ll"),
               "the image's squashfuse_ll to exit with the container", 10)


def test_a_slurm_jobs_own_gpus(slurm, user, cdi, bookworm, user_dir):
    """Real Slurm (the test node's two GPUs are GRES gpu on device nodes
    every machine has): while one job holds a GPU, a second job asks for
    one and its container, given the whole GPU kind, has the other GPU's
    device alone: the job's own, as Slurm gave it."""
    probe = "env | grep -E '^(STANDIN_GPU|SLURM_STEP_GPUS)' | sort | tr '\\n' ' '; echo"
    hold = f"; while [ ! -e {user_dir}/go ]; do sleep 0.02; done"
    run = [str(CHSPAWNER), "run", f"--cdi-dirs={cdi}", f"--device={KIND}", str(bookworm),
           "--", "sh", "-c"]
    first = slurm.popen("srun", "--gpus=1", *run, probe + hold, user=user.pw_name,
                        stdout=subprocess.PIPE)
    try:
        held = read_line(first.stdout).split()
        second = slurm.run("srun", "--gpus=1", *run, probe, user=user.pw_name).stdout.split()
    finally:
        (user_dir / "go").touch()
        assert first.wait(timeout=60) == 0
    assert sorted([held, second]) == [["SLURM_STEP_GPUS=0", "STANDIN_GPU0=yes"],
                                      ["SLURM_STEP_GPUS=1", "STANDIN_GPU1=yes"]]
