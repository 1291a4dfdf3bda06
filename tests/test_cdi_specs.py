"""CDI spec reading and device choice (chspawner.runtime.cdi), without
containers; and the spawners' GPU choice reaching RunSpec's --device."""
from __future__ import annotations

import getpass
import glob
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from traitlets import TraitError

from chspawner.runtime import cdi
from chspawner.runtime.spec import RunSpec

pytestmark = pytest.mark.unit


def spec(path: Path, kind: str = "vendor.com/gpu", names=("0", "1"), env_tag: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "cdiVersion": "0.6.0", "kind": kind,
        "devices": [{"name": n, "containerEdits": {"env": [f"DEV{n}={env_tag or path}"]}}
                    for n in names]}))
    return path


def test_default_dirs_user_first_system_wins():
    assert cdi.default_dirs({"HOME": "/home/ada"}) == [
        "/home/ada/.config/cdi", "/etc/cdi", "/var/run/cdi"]
    assert cdi.default_dirs({"XDG_CONFIG_HOME": "/cfg", "HOME": "/h"})[0] == "/cfg/cdi"
    assert cdi.default_dirs({"CH_RUN_CDI_DIRS": "/a::/b", "HOME": "/h"}) == ["/a", "/b"]


def test_a_later_directory_wins(tmp_path):
    """CDI's rule: the same device in two directories comes from the later
    (by default: the center's spec over a user's copy)."""
    spec(tmp_path / "user" / "x.json", env_tag="user")
    spec(tmp_path / "etc" / "x.yaml".replace("yaml", "json"), env_tag="center")
    registry = cdi.Registry([str(tmp_path / "user"), str(tmp_path / "etc")], {})
    assert registry.request("vendor.com/gpu=0") == [("DEV0", "center")]


@pytest.mark.parametrize("env, gpus", [
    ({}, None),
    ({"SLURM_JOB_ID": "1"}, set()),
    ({"SLURM_JOB_ID": "1", "SLURM_JOB_GPUS": "0,3"}, {"0", "3"}),
    ({"SLURM_JOB_ID": "1", "SLURM_JOB_GPUS": "0,3", "SLURM_STEP_GPUS": "3"}, {"3"}),
])
def test_a_jobs_gpus(env, gpus):
    assert cdi.job_gpus(env) == gpus


def test_other_kinds_are_not_limited_by_the_job(tmp_path):
    spec(tmp_path / "d" / "f.json", kind="vendor.com/fpga")
    registry = cdi.Registry([str(tmp_path / "d")], {"SLURM_JOB_ID": "1"})
    assert [n for n, _ in registry.request("vendor.com/fpga")] == ["DEV0", "DEV1"]


@pytest.mark.parametrize("text, message", [
    ("[]", "not a mapping"),
    ('{"kind": "a.com/b", "devices": []}', "no cdiVersion"),
    ('{"cdiVersion": "0.6.0", "kind": "nokind", "devices": []}', "kind must be vendor.com/class"),
    ('{"cdiVersion": "0.6.0", "kind": "a.com/b", "devices": []}', "no devices"),
    ('{"cdiVersion": "0.6.0", "kind": "a.com/b", "devices": [{"name": "../x", '
     '"containerEdits": {}}]}', "bad device name"),
    ('{"cdiVersion": "0.6.0", "kind": "a.com/b", "devices": [{"name": "x"}]}',
     "no containerEdits"),
    ("{", "not JSON"),
])
def test_a_bad_spec_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(cdi.CdiError, match=message) as e:
        cdi.load_spec(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_hooks_as_nvidia_ctk_writes_them():
    edits = cdi.Edits()
    edits.add({"hooks": [
        {"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk",
         "args": ["nvidia-ctk", "hook", "update-ldcache", "--folder", "/usr/lib64",
                  "--folder=/usr/lib/x86_64-linux-gnu"]},
        {"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
         "args": ["nvidia-cdi-hook", "create-symlinks", "--link", "libcuda.so.1::/usr/lib64/libcuda.so"]},
        {"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk",
         "args": ["nvidia-ctk", "hook", "chmod", "--mode", "755", "--path", "/dev/dri"]},
        {"hookName": "createContainer", "path": "/opt/vendor/setup"},
    ]}, "CDI device vendor.com/gpu=0")
    assert edits.ldcache == ["/usr/lib64", "/usr/lib/x86_64-linux-gnu"]
    assert edits.links == [("libcuda.so.1", "/usr/lib64/libcuda.so")]
    assert edits.notes == ["CDI device vendor.com/gpu=0: hook chmod not needed without privilege"]
    assert len(edits.warnings) == 1 and "/opt/vendor/setup" in edits.warnings[0]


def test_mounts_are_read_only_unless_rw_and_conflicts_are_refused(tmp_path):
    edits = cdi.Edits()
    (tmp_path / "a").touch()
    (tmp_path / "b").touch()
    edits.add({"mounts": [
        {"hostPath": str(tmp_path / "a"), "containerPath": "/x/a", "options": ["ro", "bind"]},
        {"hostPath": str(tmp_path / "b"), "containerPath": "/x/b", "options": ["rw", "rbind"]},
        {"hostPath": str(tmp_path / "a"), "containerPath": "/x//a"},  # the same again
    ]}, "d")
    assert edits.mounts == [(str(tmp_path / "a"), "/x/a", True),
                            (str(tmp_path / "b"), "/x/b", False)]
    with pytest.raises(cdi.CdiError, match="would be both"):
        edits.add({"mounts": [{"hostPath": str(tmp_path / "b"), "containerPath": "/x/a"}]}, "e")


def test_a_librarys_soname_link():
    """ldconfig names a library by its SONAME: the link is made beside the
    library, read from the ELF file itself."""
    library = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libz.so.1.*"))[0]
    assert cdi.elf_soname(library) == "libz.so.1"
    assert cdi.elf_soname("/bin/true") is None       # an executable: no SONAME
    assert cdi.elf_soname("/etc/passwd") is None     # not ELF
    edits = cdi.Edits()
    edits.ldcache = ["/opt/drv/lib/"]
    edits.mounts = [(library, "/opt/drv/lib/" + Path(library).name, True)]
    edits.add_library_links()
    assert edits.links == [(Path(library).name, "/opt/drv/lib/libz.so.1")]


def test_runspec_devices():
    spec_ = RunSpec(image="i", command=["c"], devices=["nvidia.com/gpu"], env={"A": "1"})
    options = spec_.options()
    assert options.index("--device=nvidia.com/gpu") < options.index("--set-env=A=1")
    with pytest.raises(ValueError):
        RunSpec(image="i", command=["c"], devices="nvidia.com/gpu")
    with pytest.raises(ValueError):
        RunSpec(image="i", command=["c"], devices=["x.com/gpu"], writable=True)


def test_the_slurm_spawners_gpu_choice(tmp_path):
    """GPUs asked for on the form: the containers in the job that has them
    get gpu_devices (the job's own GPUs), server or kernels; none asked,
    none given; the admin's devices always."""
    from chspawner.spawners import SlurmChSpawner
    spawner = SlurmChSpawner(images=[{"name": "deb"}], max_gpus=2, devices=["acme.com/nic"])
    spawner.user = SimpleNamespace(name=getpass.getuser())  # (its home: the job's log dir)
    spawner.store_for = lambda image: SimpleNamespace(runnable=lambda name: tmp_path)
    spawner.image, spawner.mode = "deb", "server"
    spawner.request = {"partition": "", "cpus": 1, "mem_gb": 2, "hours": 1, "gpus": 1}
    assert spawner.container_devices() == ["acme.com/nic", "nvidia.com/gpu"]
    assert "--device=nvidia.com/gpu" in spawner.container_argv()
    spawner.mode = "kernels"
    assert spawner.kernel_provisioner_config()["devices"] == ["acme.com/nic", "nvidia.com/gpu"]
    spawner.request = {**spawner.request, "gpus": 0}
    assert spawner.container_devices() == ["acme.com/nic"]
    with pytest.raises(TraitError, match="gpu_devices\\[0\\]: not a CDI device"):
        SlurmChSpawner(gpu_devices=["gpu"])
