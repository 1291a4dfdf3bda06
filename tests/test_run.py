"""``chspawner run``: the container it makes, on both backends, unprivileged."""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys

import pytest

from chspawner.runtime import Bind, RunSpec, to_argv
from chspawner.runtime.spec import LAUNCH_SCRIPT
from tests.harness.env import AS_USER, CHSPAWNER
from tests.harness.text import lines, parse_env
from tests.harness.users import as_user, user_file
from tests.harness.wait import read_line

BUILTIN_ONLY_FIX = ("Charliecloud's ch-run 0.31 has this flaw; the builtin "
                    "backend fixes it")


def mountinfo(rt, image, *opts):
    """{container mount point: (mount options, fs type)}."""
    out = rt.ok(*opts, str(image), "--", "cat", "/proc/self/mountinfo")
    mounts = {}
    for line in out.splitlines():
        fields = line.split()
        sep = fields.index("-")
        mounts[fields[4]] = (fields[5].split(","), fields[sep + 1])
    return mounts


# ------------------------------------------------------------- basics ----

def test_true_and_exit_status(rt, busybox):
    assert rt.run(str(busybox), "--", "true").returncode == 0
    assert rt.run(str(busybox), "--", "sh", "-c", "exit 7").returncode == 7
    assert rt.run(str(busybox), "true").returncode == 0  # "--" is optional


def test_identity_is_the_callers(rt, busybox, user):
    out = rt.ok(str(busybox), "--", "sh", "-c", "id -u; id -g; id -un")
    assert lines(out) == [str(user.pw_uid), str(user.pw_gid), user.pw_name]


def test_uid_gid_options(rt, busybox):
    out = rt.ok("-u", "0", "-g", "0", str(busybox), "--", "sh", "-c",
                "id -u; id -g; id -un")
    assert lines(out) == ["0", "0", "root"]
    out = rt.ok("--uid=1234", "--gid=4321", str(busybox), "--", "sh", "-c",
                "id -u; id -g")
    assert lines(out) == ["1234", "4321"]


def test_passwd_and_group_are_generated(rt, busybox, user):
    out = rt.ok(str(busybox), "--", "cat", "/etc/passwd", "/etc/group")
    assert f"{user.pw_name}:x:{user.pw_uid}:{user.pw_gid}:" in out
    assert "root:x:0:0:" in out and "nobody:x:65534:" in out
    assert f":x:{user.pw_gid}:" in out.split("root:x:0:\n", 1)[1]


def unused_id(taken) -> int:
    """An ID the host has no entry for (``taken``: pwd.getpwuid, say)."""
    for number in range(4321, 65000):
        try:
            taken(number)
        except KeyError:
            return number
    raise AssertionError("no unused ID")


def entries(text: str, number: int) -> list[str]:
    """The lines of a passwd or group file that are for ID ``number``."""
    return [line for line in text.splitlines() if line.split(":")[2:3] == [str(number)]]


@pytest.mark.parametrize("uid, gid", [(65534, 65534), (1, 1), (None, None)])
def test_guest_ids_are_named_as_on_the_host(rt, busybox, uid, gid):
    """-u/-g: the generated files name each ID as the host does (65534 is
    nobody/nogroup), or charlie/charliegroup where the host has no entry;
    each ID appears once."""
    if uid is None:
        uid, gid = unused_id(pwd.getpwuid), unused_id(grp.getgrgid)
        user_name, group_name = "charlie", "charliegroup"
    else:
        user_name, group_name = pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name
    out = rt.ok("-u", str(uid), "-g", str(gid), str(busybox), "--", "sh", "-c",
                "id -un; id -gn; echo; cat /etc/passwd; echo; cat /etc/group")
    names, passwd, group = out.split("\n\n")
    assert lines(names) == [user_name, group_name]
    assert [e.split(":")[0] for e in entries(passwd, uid)] == [user_name]
    assert [e.split(":")[0] for e in entries(group, gid)] == [group_name]
    assert entries(passwd, 0) and entries(group, 0)  # root stays


def test_no_passwd_shows_the_images_files(rt, busybox, user):
    out = rt.ok("--no-passwd", str(busybox), "--", "cat", "/etc/passwd")
    assert out == (busybox / "etc/passwd").read_text()
    assert user.pw_name not in out


def test_no_temporary_files_left_anywhere(rt, busybox, user_dir):
    """passwd/group files are never left on the host: not on success, not
    after an exec failure, not after a runtime error."""
    def snapshot():
        return set(os.listdir("/tmp")), set(os.listdir(user_dir))
    before = snapshot()
    env = {"TMPDIR": str(user_dir)}
    assert rt.run(str(busybox), "--", "true", env=env).returncode == 0
    assert rt.run(str(busybox), "--", "no-such-cmd", env=env).returncode == rt.exit_exec
    assert rt.run("-c", "/no/such/dir", str(busybox), "--", "true",
                  env=env).returncode == rt.exit_runtime
    assert snapshot() == before


def test_image_is_read_only_unless_write(rt, user_image):
    result = rt.run(str(user_image), "--", "touch", "/newfile")
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr
    assert not (user_image / "newfile").exists()
    rt.ok("-w", str(user_image), "--", "touch", "/newfile")
    assert (user_image / "newfile").exists()


@pytest.mark.builtin_only("Charliecloud 0.31 has no --write-fake")
def test_write_fake_overlay_leaves_image_unchanged(rt, user_image):
    out = rt.ok("-W", str(user_image), "--", "sh", "-c",
                "echo hello > /etc/motd && mkdir -p /opt/x && cat /etc/motd")
    assert out == "hello\n"
    assert not (user_image / "etc/motd").exists()
    assert not (user_image / "opt").exists()
    rt.ok("--write-fake=4m", str(user_image), "--", "touch", "/f")
    assert not (user_image / "f").exists()
    big = rt.run("--write-fake=1m", str(user_image), "--", "sh", "-c",
                 "dd if=/dev/zero of=/big bs=1k count=2048")
    assert big.returncode != 0 and "No space left" in big.stderr


def test_host_dirs_are_bound(rt, busybox):
    mounts = mountinfo(rt, busybox)
    for path in ("/dev", "/proc", "/sys", "/tmp"):
        assert path in mounts
    assert mounts["/"][0][0] == "ro"


@pytest.mark.builtin_only(BUILTIN_ONLY_FIX)
def test_host_files_are_really_read_only(rt, busybox):
    mounts = mountinfo(rt, busybox)
    for path in ("/etc/hosts", "/etc/resolv.conf", "/etc/passwd", "/etc/group"):
        if path in mounts:
            assert mounts[path][0][0] == "ro", path
    assert "/etc/hosts" in mounts


def test_tmp_is_hosts_or_private(rt, busybox, user, user_dir):
    env = {"TMPDIR": str(user_dir)}
    rt.ok(str(busybox), "--", "sh", "-c", "echo shared > /tmp/marker", env=env)
    assert (user_dir / "marker").read_text() == "shared\n"
    rt.ok("-t", str(busybox), "--", "sh", "-c",
          "test ! -e /tmp/marker && echo private > /tmp/other", env=env)
    assert not (user_dir / "other").exists()
    mounts = mountinfo(rt, busybox, "--private-tmp")
    assert mounts["/tmp"][1] == "tmpfs"


def test_cd(rt, busybox):
    assert rt.ok(str(busybox), "--", "pwd") == "/\n"
    assert rt.ok("-c", "/etc", str(busybox), "--", "pwd") == "/etc\n"
    assert rt.ok("--cd=/tmp", str(busybox), "--", "pwd") == "/tmp\n"
    result = rt.run("--cd=/nonexistent", str(busybox), "--", "pwd")
    assert result.returncode == rt.exit_runtime
    assert "/nonexistent" in result.stderr


def test_no_new_privs_and_default_signal_dispositions(rt, busybox):
    status = rt.ok(str(busybox), "--", "cat", "/proc/self/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    # Nothing ignored: a Python launcher must not leak its SIG_IGN for SIGPIPE.
    assert int(fields["SigIgn"], 16) == 0
    # so a pipeline's writer dies quietly when the reader is gone:
    out = rt.ok(str(busybox), "--", "sh", "-c", "yes | head -n 1")
    assert out == "y\n"


def test_only_user_and_mount_namespaces(rt, busybox):
    out = rt.ok(str(busybox), "--", "sh", "-c",
                "for n in user mnt net pid uts ipc; do readlink /proc/self/ns/$n; done")
    inside = dict(zip(["user", "mnt", "net", "pid", "uts", "ipc"], lines(out)))
    for ns in ("net", "pid", "uts", "ipc"):
        assert inside[ns] == os.readlink(f"/proc/self/ns/{ns}"), ns
    for ns in ("user", "mnt"):
        assert inside[ns] != os.readlink(f"/proc/self/ns/{ns}"), ns


# -------------------------------------------- process, pid, signals ----

def test_command_is_the_process_no_supervisor(rt, busybox):
    """The command keeps the PID we started: nothing sits in between, and
    a signal sent to that PID reaches the command itself."""
    proc = rt.popen(str(busybox), "--", "sh", "-c",
                    'trap "echo got TERM; exit 42" TERM; echo $$; '
                    'while :; do sleep 0.05; done',
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert int(read_line(proc.stdout)) == proc.pid
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
        assert int(status["PPid"]) == os.getpid()
        assert os.readlink(f"/proc/{proc.pid}/exe").endswith("busybox")
        proc.send_signal(signal.SIGTERM)
        assert read_line(proc.stdout) == "got TERM"
        assert proc.wait(timeout=20) == 42
    finally:
        proc.kill()
        proc.wait()


def test_killed_command_reports_its_signal(rt, busybox):
    proc = rt.popen(str(busybox), "--", "sh", "-c", "echo up; exec sleep 60",
                    stdout=subprocess.PIPE)
    try:
        assert read_line(proc.stdout) == "up"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == -signal.SIGINT
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------- environment ---

def test_environment_defaults(rt, busybox, user, user_dir):
    env = parse_env(rt.ok(str(busybox), "--", "env",
                          env={"TMPDIR": str(user_dir), "PATH": "/usr/bin",
                               "KEEP_ME": "host value"}))
    assert env["CH_RUNNING"] == "Weird Al Yankovic"
    assert env["HOME"] == user.pw_dir          # unchanged without --home
    assert env["PATH"] == "/usr/bin:/bin"      # /bin appended when missing
    assert "TMPDIR" not in env
    assert env["KEEP_ME"] == "host value"      # host env passes through
    env = parse_env(rt.ok(str(busybox), "--", "env"))
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"  # already there


def test_set_env_forms(rt, busybox, user, user_dir):
    envfile = user_file(user, user_dir / "vars",
                        "FROMFILE=one\nQUOTED='two words'\n\nEQ=a=b\n")
    env = parse_env(rt.ok(
        "--set-env=PLAIN=bar", "--set-env=Q='quoted'",
        f"--set-env={envfile}",
        "--set-env=PREPEND=/opt/bin:$PATH", "--set-env=GAP=a:$NOPE:b",
        str(busybox), "--", "env"))
    assert env["PLAIN"] == "bar"
    assert env["Q"] == "quoted"
    assert env["FROMFILE"] == "one" and env["QUOTED"] == "two words"
    assert env["EQ"] == "a=b"
    assert env["PREPEND"] == "/opt/bin:/usr/local/bin:/usr/bin:/bin"
    assert env["GAP"] == "a:b"


def test_set_env_keeps_a_lone_dollar(rt, busybox):
    """Only "$NAME" items are expanded: a "$" on its own is kept."""
    env = parse_env(rt.ok("--set-env=FOO=bar:$", "--set-env=D=$",
                          "--set-env=MID=a:$:b", str(busybox), "--", "env"))
    assert (env["FOO"], env["D"], env["MID"]) == ("bar:$", "$", "a:$:b")


def without(rt, variable: str, *args: str) -> subprocess.CompletedProcess:
    """``chspawner run ARGS`` with ``variable`` unset in its environment."""
    argv = rt.argv(*args)
    at = argv.index("env") + 1
    argv[at:at] = ["-u", variable]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_unset_path_stays_unset_with_a_warning(rt, busybox):
    """As ch-run: no $PATH is made up; commands are still found (execvp's
    default search) and a warning says why PATH is missing."""
    result = without(rt, "PATH", str(busybox), "--", "env")
    assert result.returncode == 0, result.stderr
    assert "PATH" not in parse_env(result.stdout)
    assert "$PATH not set" in result.stderr


def test_unset_user_is_refused(rt, busybox):
    result = without(rt, "USER", str(busybox), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert "$USER not set" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_set_env_from_image(rt, busybox):
    env = parse_env(rt.ok("--set-env", str(busybox), "--", "env"))
    assert env["PATH"] == (busybox / "ch/environment").read_text().split("=", 1)[1].strip()


def test_env_no_expand(rt, busybox):
    env = parse_env(rt.ok("--env-no-expand", "--set-env=X=$PATH", str(busybox),
                          "--", "env"))
    assert env["X"] == "$PATH"


def test_set_and_unset_apply_in_command_line_order(rt, busybox):
    env = parse_env(rt.ok("--set-env=A=1", "--unset-env=A", "--unset-env=B",
                          "--set-env=B=2", str(busybox), "--", "env"))
    assert "A" not in env and env["B"] == "2"


def test_unset_env_globs(rt, busybox):
    host = {"WANTED_1": "y", "ALSO_WANTED_2": "y", "NOT_WANTED": "n"}
    env = parse_env(rt.ok("--unset-env=NOT_*", str(busybox), "--", "env", env=host))
    assert "NOT_WANTED" not in env and env["WANTED_1"] == "y"
    env = parse_env(rt.ok("--unset-env=!(WANTED_*|ALSO_WANTED_*)", str(busybox),
                          "--", "env", env=host))
    assert set(env) == {"WANTED_1", "ALSO_WANTED_2", "CH_RUNNING"}
    env = parse_env(rt.ok("--unset-env=*", str(busybox), "--", "env"))
    assert env == {"CH_RUNNING": "Weird Al Yankovic"}  # never unset


def test_set_env_errors(rt, busybox, user, user_dir):
    result = rt.run("--set-env=/no/such/file", str(busybox), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert "/no/such/file" in result.stderr
    bad = user_file(user, user_dir / "bad", "GOOD=1\nno separator\n")
    result = rt.run(f"--set-env={bad}", str(busybox), "--", "true")
    assert result.returncode == rt.exit_runtime
    result = rt.run("--set-env==value", str(busybox), "--", "true")
    assert result.returncode == rt.exit_runtime


def test_home(rt, busybox, user):
    marker = os.path.join(user.pw_dir, ".chspawner-test-marker")
    with open(marker, "w") as f:
        f.write("from host home\n")
    try:
        out = rt.ok("--home", str(busybox), "--", "sh", "-c",
                    'echo $HOME; cat "$HOME/.chspawner-test-marker"; ls /home')
        assert lines(out) == [f"/home/{user.pw_name}", "from host home", user.pw_name]
    finally:
        os.unlink(marker)


# ------------------------------------------------------------- images ----

def test_image_by_name_in_store(rt, user, user_dir, busybox):
    store = user_dir / "store"
    as_user(user.pw_name, "mkdir", "-p", str(store / "img"))
    as_user(user.pw_name, "cp", "-r", str(busybox), str(store / "img/example.com%tools+1.0"))
    assert rt.ok("-s", str(store), "example.com/tools:1.0", "--", "echo", "hi") == "hi\n"
    env = {"CH_IMAGE_STORAGE": str(store)}
    assert rt.ok("example.com/tools:1.0", "--", "echo", "hi", env=env) == "hi\n"
    result = rt.run("-s", str(store), "example.com/other", "--", "true")
    assert result.returncode == rt.exit_runtime


@pytest.mark.parametrize("missing", ["dev", "proc", "sys", "tmp", "etc/passwd"])
def test_broken_image_names_what_is_missing(rt, user, user_image, missing):
    as_user(user.pw_name, "rm", "-rf", str(user_image / missing))
    result = rt.run(str(user_image), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert f"/{missing}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_image(rt, user_dir):
    result = rt.run(str(user_dir / "nope"), "--", "true")
    assert result.returncode == rt.exit_runtime
    assert "nope" in result.stderr


def test_command_not_found(rt, busybox):
    result = rt.run(str(busybox), "--", "no-such-command")
    assert result.returncode == rt.exit_exec
    assert "no-such-command" in result.stderr
    result = rt.run(str(busybox), "--", "/etc/passwd")  # not executable
    assert result.returncode == rt.exit_exec


def test_python_in_debian_image(rt, bookworm):
    out = rt.ok("--set-env", str(bookworm), "--", "python3", "-c",
                "import sys, os; print(sys.version_info[:2], os.getcwd())")
    assert out == "(3, 11) /\n"


# ---------------------------------------------------- output, options ----

def test_verbose(rt, busybox):
    quiet = rt.run(str(busybox), "--", "true")
    loud = rt.run("-vv", str(busybox), "--", "true")
    assert quiet.stderr == ""
    assert loud.returncode == 0 and len(loud.stderr) > 0


@pytest.mark.builtin_only("Charliecloud 0.31 has no --quiet")
def test_quiet_levels(rt, busybox):
    cmd = (str(busybox), "--", "sh", "-c", "echo out; echo err >&2")
    assert rt.run("-q", *cmd).stdout == "out\n"
    r = rt.run("-qq", *cmd)
    assert (r.stdout, r.stderr) == ("", "err\n")
    r = rt.run("-qqq", *cmd)
    assert (r.stdout, r.stderr) == ("", "")


@pytest.mark.parametrize("args", [
    ["--bogus", "IMG", "--", "true"],
    ["-Z", "IMG", "--", "true"],
    ["IMG"],                              # no command
    [],                                   # no image
    ["--bind"],                           # missing argument
    ["-w", "-W", "IMG", "--", "true"],
    ["-v", "-q", "IMG", "--", "true"],
    ["--join-pid=1", "-j", "IMG", "--", "true"],
    ["--home=x", "IMG", "--", "true"],
    ["--write-fake=lots", "IMG", "--", "true"],
    ["-W=4gb", "IMG", "--", "true"],
])
def test_usage_errors(rt, busybox, args):
    args = [str(busybox) if a == "IMG" else a for a in args]
    result = rt.run(*args)
    assert result.returncode == 64, result.stderr
    assert result.stderr.startswith("chspawner run: error: ")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("args, what", [
    (["-b", ""], "--bind"),
    (["-b", ":/mnt"], "--bind"),
    (["-b", "/tmp:"], "--bind"),
    (["-b", "/tmp:/"], "--bind"),
    (["-b", "/tmp:mnt"], "--bind"),       # relative destination
    (["--uid=abc"], "--uid"),
    (["-u", "-1"], "--uid"),
    (["-u", "12 "], "--uid"),
    (["-g", "1x"], "--gid"),
    (["--join-ct=abc"], "--join-ct"),
    (["--join-ct=1a"], "--join-ct"),
    (["--join-ct=2147483648"], "--join-ct"),
    (["--join-pid=x"], "--join-pid"),
    (["--unset-env="], "--unset-env"),
])
def test_bad_option_values_are_runtime_errors(rt, busybox, user_dir, args, what):
    """As ch-run: a bad value is a runtime error (exit 31; 0.31: 1), not a
    usage error; one line naming the option, and nothing started."""
    marker = user_dir / "ran"
    result = rt.run(*args, str(busybox), "--", "touch", "/tmp/ran",
                    env={"TMPDIR": str(user_dir)})
    assert result.returncode == rt.exit_runtime, result.stderr
    assert what in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    if rt.backend == "builtin":
        assert result.stderr.startswith("chspawner run: error: ")
    assert not marker.exists()


def test_help_and_version(rt):
    result = rt.run("--help")
    assert result.returncode == 0 and "--bind" in result.stdout
    result = rt.run("--version")
    assert result.returncode == 0 and result.stdout.strip()[0].isdigit()


def test_feature_probe(builtin):
    assert builtin.run("--feature=extglob").returncode == 0
    assert builtin.run("--feature=overlayfs").returncode == 0
    assert builtin.run("--feature=nonsense").returncode == 31


def test_chspawner_without_subcommand(user):
    result = as_user(user.pw_name, str(CHSPAWNER), check=False)
    assert result.returncode == 64
    assert "run" in result.stdout


def test_setuid_and_setgid_are_refused(builtin, busybox, user_dir):
    """The builtin launcher needs no privilege and refuses to have any."""
    python = os.path.realpath(sys.executable)
    for mode in (0o4755, 0o2755):
        copy = user_dir / f"python-{mode:o}"
        shutil.copy2(python, copy)
        os.chown(copy, 0, 0)
        copy.chmod(mode)
        result = as_user(builtin.user, str(copy), "-I", "-S", LAUNCH_SCRIPT,
                         str(busybox), "--", "true", check=False)
        assert result.returncode == 31, result.stderr
        assert "setuid" in result.stderr
        copy.unlink()


def test_a_runspec_runs_on_both_backends(rt, user, user_dir, busybox):
    """The API path: what to_argv builds starts the same container on both."""
    data = user_dir / "data"
    as_user(user.pw_name, "mkdir", str(data))
    user_file(user, data / "f", "bound\n")
    spec = RunSpec(str(busybox), ["sh", "-c", 'cat /mnt/f; echo "$GREETING"; pwd; id -u'],
                   binds=[Bind(str(data), "/mnt")], env={"GREETING": "'hi there'"},
                   cwd="/etc", uid=0, unset_env=["LANG"])
    result = subprocess.run([str(AS_USER), user.pw_name, *to_argv(spec, rt.backend)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["bound", "'hi there'", "/etc", "0"]
