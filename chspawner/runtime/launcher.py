"""The builtin container launcher: ch-run's command line, in stdlib Python.

This module is the hot path of every container start, so it imports only
what it must (no argparse, no re, no dataclasses) and can run on its own as
``python -I -S launcher.py [OPTION...] IMAGE [--] CMD [ARG...]``. It sets up
the container in the calling process and then ``exec``s the command: the
command keeps our PID, nothing supervises it, and signals reach it directly.

The container is what Charliecloud's ch-run makes: a user namespace (the
caller's uid and gid mapped to themselves, or to ``-u``/``-g``) plus a mount
namespace, pivoted into the image directory. Host network, devices and file
systems stay native. The differences from ch-run are fixes:

* ``/etc/hosts``, ``/etc/resolv.conf``, ``/etc/machine-id`` are really
  read-only (a bind mount ignores MS_RDONLY until it is remounted);
* ``/etc/passwd`` and ``/etc/group`` are written into a private tmpfs, so no
  temporary file is ever left on the host;
* every path inside the image is resolved inside the image, one component
  at a time through file descriptors, and mounted through
  ``/proc/self/fd/N``: symlinks (absolute or relative) and ``..`` can't lead
  a mount out of the image, and nothing can be swapped between check and use;
* bind destinations are created only with ``-w``/``-W`` and never under
  another mount (a host directory);
* a SquashFS image stays mounted as long as any process of the container
  lives (ch-run's unmounts it when its first command exits).

A SquashFS image (a file, or ``img/NAME.sqfs`` in the store) is mounted
with Debian's ``squashfuse_ll`` inside the container's user namespace: no
setuid helper, no root. The FUSE server runs beside the container, in a
mount namespace of its own that never holds the image's mount, so when
the container's last process exits the kernel drops the mount and the
server exits with it; the command is still ``exec``ed with our PID. A
directory image gets no extra process at all. With
``$CHSPAWNER_SQUASH_LINGER`` a keeper holds the mount between starts, so
the next start finds it warm (:class:`WarmMount`).

Exit codes are ch-run's: 31 runtime error, 49 the command can't be executed,
64 usage; otherwise the command's own status.
"""

import os
import sys

EXIT_RUNTIME = 31
EXIT_EXEC = 49
EXIT_USAGE = 64

PROG = "chspawner run"
DEFAULT_JOIN_DIR = "/dev/shm"
CH_RUNNING = "Weird Al Yankovic"  # ch-run's value; scripts test for it

USAGE = """\
Usage: chspawner run [OPTION...] IMAGE [--] [CMD [ARG...]]

Run CMD in an unprivileged container made from IMAGE (a directory, a
SquashFS file, or the name of an image in the store). Options are those
of Charliecloud's ch-run.
Without CMD, run the image's own Entrypoint and Cmd, in its WorkingDir,
with its environment (as Docker does).

  -b, --bind=SRC[:DST]    bind-mount host SRC at guest DST (default: SRC)
  -c, --cd=DIR            initial working directory in the container
      --cdi-dirs=DIRS     where CDI specs are (default $CH_RUN_CDI_DIRS, or
                          ~/.config/cdi:/etc/cdi:/var/run/cdi)
      --device=DEV        give the container CDI device DEV: vendor/class=NAME,
                          a whole kind vendor/class, or a spec FILE (in a
                          Slurm job, GPUs are the job's own); repeatable
  -d, --devices           give the container every CDI device found
      --env-no-expand     don't expand $VAR in --set-env values
      --feature=FEAT      exit 0 if FEAT (extglob, overlayfs) is supported
  -g, --gid=GID           run as GID within the container
      --home              bind host $HOME at /home/$USER, set $HOME to it
  -j, --join              share one container with peer invocations
      --join-ct=N         number of join peers (implies --join)
      --join-pid=PID      join the container of process PID
      --join-tag=TAG      label of the peer group (implies --join)
  -m, --mount=DIR         SquashFS mount point (default
                          /var/tmp/$USER.ch/mnt, made if needed)
      --no-passwd         don't generate /etc/passwd and /etc/group
  -q, --quiet             print less; -qq: no command stdout; -qqq: nor
                          its stderr
  -s, --storage=DIR       image store (default $CH_IMAGE_STORAGE or
                          /var/tmp/$USER.ch)
      --set-env[=ARG]     set variables: image's ch/environment (no ARG),
                          NAME=VALUE, or a host FILE of such lines
  -t, --private-tmp       private tmpfs at /tmp instead of the host's
  -u, --uid=UID           run as UID within the container
      --unset-env=GLOB    unset variables whose names match GLOB
  -v, --verbose           print more (repeatable)
  -w, --write             mount the image read-write
  -W, --write-fake[=SIZE] writable tmpfs overlay over a read-only image
      --backend=NAME      builtin (default, or $CHSPAWNER_BACKEND) or ch-run
  -?, -h, --help          print this help and exit
  -V, --version           print the version and exit

Environment: CHSPAWNER_SQUASH_LINGER=SECONDS keeps a SquashFS image's
mount that long after its last start, warm for the next (default 0).

Exit status: the command's own; 31 runtime error, 49 can't execute the
command, 64 usage error.
"""


class Fail(Exception):
    """An error that ends the launch: a one-line message and an exit code."""

    def __init__(self, message, code=EXIT_RUNTIME):
        super().__init__(message)
        self.code = code


# -------------------------------------------------------------- options ----

class Options:
    """ch-run's options, parsed. Defaults are ch-run's."""

    __slots__ = (
        "binds", "cd", "env_ops", "env_expand", "feature", "uid", "gid", "home", "join", "join_ct",
        "join_tag", "join_pid", "mount", "passwd", "storage", "private_tmp",
        "writable", "write_fake", "verbose", "quiet", "backend", "backend_argv",
        "image", "command", "action", "error", "devices", "cdi_dirs",
    )

    def __init__(self):
        self.binds = []        # [(src, dst)]
        self.cd = None
        self.env_ops = []      # [("image"|"file"|"set"|"unset", arg)]
        self.env_expand = True  # global, as in ch-run, wherever it appears
        self.feature = None
        self.uid = None
        self.gid = None
        self.home = False
        self.join = False
        self.join_ct = None
        self.join_tag = None
        self.join_pid = None
        self.mount = None       # -m: the SquashFS mount point
        self.passwd = True
        self.storage = None
        self.private_tmp = False
        self.writable = False
        self.write_fake = None  # tmpfs size string; "" = tmpfs default
        self.verbose = 0        # -v count: more messages on stderr
        self.quiet = 0          # -q count: -qq silences the command's stdout,
                                # -qqq its stderr too (as ch-run)
        self.backend = None
        self.backend_argv = ()  # indices in argv of --backend and its value
        self.image = None
        self.command = []
        self.action = "run"     # or "help", "version"
        self.error = None       # the first bad option value (a Fail), if any
        self.devices = False    # --device/--devices given (kept in env_ops, in order)
        self.cdi_dirs = None    # --cdi-dirs: where CDI specs are looked for


INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1


def parse_int(text, what, extra_ok=False):
    """An int as ch-run reads one (strtol(3) into a C int): leading blanks
    and a sign allowed; trailing characters only with ``extra_ok`` (the
    environment's "4(x2)"). A bad value is a runtime error, as in ch-run:
    only an unknown option or a missing argument is a usage error."""
    rest = text.lstrip(" \t\n\v\f\r")
    sign = rest[:1] if rest[:1] in ("+", "-") else ""
    rest = rest[len(sign):]
    digits = len(rest) - len(rest.lstrip("0123456789"))
    if not digits:
        raise Fail(f"{what}: no digits found in {text!r}")
    number = int(sign + rest[:digits])
    if not INT_MIN <= number <= INT_MAX:
        raise Fail(f"{what}: out of range: {text!r}")
    if digits < len(rest) and not extra_ok:
        raise Fail(f"{what}: extra characters after digits: {text!r}")
    return number


def _id_arg(what, value):
    number = parse_int(value, what)
    if number < 0:
        raise Fail(f"{what}: must be non-negative: {value!r}")
    return number


def _set_bind(o, value):
    # ch-run's checks, on the text: no empty parts, an absolute DST, not /.
    # Where DST leads inside the image is checked when it is mounted.
    src, sep, dst = value.partition(":")
    if not src:
        raise Fail(f"--bind: no source provided: {value!r}")
    if sep and not dst:
        raise Fail(f"--bind: no destination provided: {value!r}")
    dst = dst or src
    if dst == "/":
        raise Fail(f"--bind: destination can't be /: {value!r}")
    if not dst.startswith("/"):
        raise Fail(f"--bind: destination must be absolute: {value!r}")
    o.binds.append((src, dst))


def _set_join_ct(o, v):
    # 0 means "not given" (the environment decides), as in ch-run; a
    # negative count is refused when the peers are counted.
    o.join, o.join_ct = True, (parse_int(v, "--join-ct") or None)


def _set_join_pid(o, v):
    pid = parse_int(v, "--join-pid")
    if pid < 0:
        raise Fail(f"--join-pid: no such process: {v!r}")
    o.join_pid = pid or None  # 0: not given, as in ch-run


def _set_join_tag(o, v):
    o.join, o.join_tag = True, v  # an empty tag is refused at join time


def _set_unset_env(o, v):
    if not v:
        raise Fail("--unset-env: GLOB must not be empty")
    o.env_ops.append(("unset", v))


def _set_env(o, v):
    if v is None:
        o.env_ops.append(("image", None))
    elif "=" in v:
        o.env_ops.append(("set", v))
    else:
        o.env_ops.append(("file", v))


def _set_device(o, v):
    # CDI devices go where the environment options go: their environment
    # applies in command-line order with --set-env and --unset-env.
    if not v:
        raise Fail("--device: empty device name")
    o.devices = True
    o.env_ops.append(("device", v))


def _set_devices(o, _v):
    o.devices = True
    o.env_ops.append(("devices", None))


def _set_write_fake(o, v):
    # tmpfs(5) size: a number with an optional k/m/g/t suffix, or a percentage
    # of memory. Checked here so a typo isn't reported as a mount failure.
    number = (v or "").rstrip("kKmMgGtT%")
    if v and (not number.isdigit() or len(v) - len(number) > 1):
        raise Fail(f"--write-fake: bad size {v!r} (e.g. 4g, 512m, 25%)",
                   EXIT_USAGE)
    o.write_fake = v or ""


def _set_feature(o, v):
    o.action, o.feature = "feature", v


def _set_backend(o, v):
    if v not in ("builtin", "ch-run"):
        raise Fail(f"--backend: unknown backend {v!r} (builtin, ch-run)",
                   EXIT_USAGE)
    o.backend = v


def _set_flag(attr, value):
    def setter(o, _v):
        setattr(o, attr, value)
    return setter


def _bump(attr, step):
    def setter(o, _v):
        setattr(o, attr, getattr(o, attr) + step)
    return setter


# (short, long, argument) -> setter. argument: "no", "required", "optional"
# (an optional argument is only taken with "=", as with getopt).
_OPTION_TABLE = (
    ("b", "bind", "required", _set_bind),
    ("c", "cd", "required", lambda o, v: setattr(o, "cd", v)),
    (None, "cdi-dirs", "required", lambda o, v: setattr(o, "cdi_dirs", v)),
    ("d", "devices", "no", _set_devices),
    (None, "device", "required", _set_device),
    (None, "env-no-expand", "no", _set_flag("env_expand", False)),
    (None, "feature", "required", _set_feature),
    ("g", "gid", "required", lambda o, v: setattr(o, "gid", _id_arg("--gid", v))),
    (None, "home", "no", _set_flag("home", True)),
    ("j", "join", "no", _set_flag("join", True)),
    (None, "join-ct", "required", _set_join_ct),
    (None, "join-pid", "required", _set_join_pid),
    (None, "join-tag", "required", _set_join_tag),
    ("m", "mount", "required", lambda o, v: setattr(o, "mount", v)),
    (None, "no-home", "no", lambda o, v: None),  # deprecated no-op in ch-run
    (None, "no-passwd", "no", _set_flag("passwd", False)),
    ("q", "quiet", "no", _bump("quiet", 1)),
    ("s", "storage", "required", lambda o, v: setattr(o, "storage", v)),
    (None, "set-env", "optional", _set_env),
    ("t", "private-tmp", "no", _set_flag("private_tmp", True)),
    ("u", "uid", "required", lambda o, v: setattr(o, "uid", _id_arg("--uid", v))),
    (None, "unset-env", "required", _set_unset_env),
    ("v", "verbose", "no", _bump("verbose", 1)),
    ("w", "write", "no", _set_flag("writable", True)),
    ("W", "write-fake", "optional", _set_write_fake),
    (None, "backend", "required", _set_backend),
    ("?", "help", "no", _set_flag("action", "help")),
    ("h", None, "no", _set_flag("action", "help")),
    (None, "usage", "no", _set_flag("action", "usage")),
    ("V", "version", "no", _set_flag("action", "version")),
)
_SHORT = {s: (f"-{s}", kind, fn) for s, _l, kind, fn in _OPTION_TABLE if s}
_LONG = {l: (f"--{l}", kind, fn) for _s, l, kind, fn in _OPTION_TABLE if l}


def parse_args(argv):
    """Parse ch-run's command line: ``[OPTION...] IMAGE [--] CMD [ARG...]``.

    Options may also follow IMAGE up to ``--`` or the first non-option, as
    ch-run (argp) allows. Raises Fail(..., 64) on a usage error. A bad
    option value (ch-run's runtime error) is kept in ``o.error`` and ends
    the parse, so that the ch-run backend can let ch-run report it.
    """
    o = Options()
    try:
        _parse(o, argv)
    except Fail:
        if o.error is None:
            raise
    if o.action != "run" or o.error is not None:
        return o
    if o.image is None:
        raise Fail("no image given", EXIT_USAGE)
    if o.writable and o.write_fake is not None:
        raise Fail("--write and --write-fake are mutually exclusive", EXIT_USAGE)
    if o.verbose and o.quiet:
        raise Fail("--verbose and --quiet are mutually exclusive", EXIT_USAGE)
    if o.devices and o.writable:
        raise Fail("--device can't be used with --write: a device's files are never "
                   "written into the image (use -W)", EXIT_USAGE)
    if o.join_pid is not None and (o.join or o.join_ct or o.join_tag):
        raise Fail("--join-pid can't be combined with --join", EXIT_USAGE)
    return o


def _apply(o, setter, value):
    """Run an option's setter. Its first bad value is kept in ``o.error``
    and ends the parse, as ch-run stops there (parse_args then ignores any
    later error)."""
    try:
        setter(o, value)
    except Fail as e:
        if e.code != EXIT_USAGE and o.error is None:
            o.error = e
        raise


def _parse(o, argv):
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            if o.image is None:
                if i >= len(argv):
                    break
                o.image = argv[i]
                i += 1
            o.command = argv[i:]
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in _LONG:
                raise Fail(f"unrecognized option '--{name}'", EXIT_USAGE)
            label, kind, setter = _LONG[name]
            if name == "backend":
                o.backend_argv = (i - 1,) if eq else (i - 1, i)
            if kind == "no":
                if eq:
                    raise Fail(f"option '{label}' takes no argument", EXIT_USAGE)
                value = None
            elif kind == "required" and not eq:
                if i >= len(argv):
                    raise Fail(f"option '{label}' requires an argument", EXIT_USAGE)
                value = argv[i]
                i += 1
            elif kind == "optional" and not eq:
                value = None
            _apply(o, setter, value)
        elif arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):  # clustered short options: -wt, -bSRC
                letter = arg[j]
                j += 1
                if letter not in _SHORT:
                    raise Fail(f"invalid option -- '{letter}'", EXIT_USAGE)
                label, kind, setter = _SHORT[letter]
                value = None
                if kind == "required":
                    if j < len(arg):
                        value = arg[j:]
                    elif i < len(argv):
                        value = argv[i]
                        i += 1
                    else:
                        raise Fail(f"option requires an argument -- '{letter}'",
                                   EXIT_USAGE)
                    j = len(arg)
                elif kind == "optional" and j < len(arg):
                    value = arg[j:].removeprefix("=")
                    j = len(arg)
                _apply(o, setter, value)
        elif o.image is None:
            o.image = arg
        else:
            o.command = argv[i - 1:]
            break


# ---------------------------------------------------------------- libc -----

class _LibcFunctions:
    """The C library's functions by name (each returning an int, errno kept
    for ``get_errno``), made from the ``_ctypes`` extension itself: the
    ``ctypes`` package around it costs ~3 ms to import, a fifth of a
    container's start."""

    def __init__(self):
        import _ctypes

        class Int(_ctypes._SimpleCData):
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = Int

        class ULong(_ctypes._SimpleCData):
            _type_ = "L"

        class Long(_ctypes._SimpleCData):
            _type_ = "l"

        self._function, self.ulong, self.long = Function, ULong, Long
        self.get_errno = _ctypes.get_errno
        self._handle = _ctypes.dlopen(None, 0)

    def __getattr__(self, name):
        function = self._function((name, self))
        setattr(self, name, function)
        return function


class _Libc:
    """The few system calls Python's os module lacks (before 3.12), by _ctypes.

    Loaded only when a container is really set up, so --help and usage
    errors stay fast.
    """

    CLONE_NEWNS = 0x00020000
    CLONE_NEWUSER = 0x10000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
    MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC = 32, 4096, 8192, 16384
    MS_PRIVATE = 1 << 18
    MNT_DETACH = 2
    PR_SET_NO_NEW_PRIVS = 38
    FNM_EXTMATCH = 1 << 5
    # pivot_root(2) has no glibc wrapper; its number depends on the machine.
    SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203,
                      "riscv64": 41, "s390x": 217, "i686": 217}

    def __init__(self):
        self.c = _LibcFunctions()

    def _check(self, result, what):
        if result != 0:
            raise Fail(f"{what}: {os.strerror(self.c.get_errno())}")

    def unshare(self, flags, what="user+mount namespaces"):
        self._check(self.c.unshare(flags), f"can't unshare(2) {what}")

    def setns(self, fd, what):
        self._check(self.c.setns(fd, 0), f"can't join {what}")

    def mount(self, src, target, fstype, flags, data, what):
        enc = os.fsencode
        result = self.c.mount(
            None if src is None else enc(src), enc(target),
            None if fstype is None else enc(fstype),
            self.c.ulong(flags), None if data is None else enc(data))
        self._check(result, what)

    def umount(self, target, what):
        self._check(self.c.umount2(os.fsencode(target), self.MNT_DETACH), what)

    def pivot_root(self, new, old):
        number = self.SYS_PIVOT_ROOT.get(os.uname().machine)
        if number is None:
            raise Fail(f"pivot_root(2): unknown machine {os.uname().machine}")
        result = self.c.syscall(self.c.long(number), os.fsencode(new), os.fsencode(old))
        return 0 if result == 0 else self.c.get_errno()

    def no_new_privs(self):
        self._check(self.c.prctl(self.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                    "can't set no_new_privs")

    def fnmatch(self, pattern, name):
        return self.c.fnmatch(os.fsencode(pattern), os.fsencode(name),
                              self.FNM_EXTMATCH) == 0


# statvfs(3) flags that a bind remount inside a user namespace must keep
# ("locked" flags), mapped to their MS_* values.
_STATVFS_TO_MS = ((1, 1), (2, 2), (4, 4), (8, 8), (1024, 1024), (2048, 2048),
                  (4096, 1 << 21))


def _locked_flags(path):
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _STATVFS_TO_MS if f_flag & st)


# ------------------------------------------------------ path resolution ----

O_PATH = getattr(os, "O_PATH", 0o10000000)
MAX_SYMLINKS = 40


class Root:
    """An image root, with paths resolved strictly inside it.

    ``open(path)`` walks ``path`` one component at a time from the root's
    directory file descriptor with O_NOFOLLOW; a symlink is read and its
    target walked in turn, an absolute one from the image root, and ``..``
    never climbs above the root. The result is an O_PATH descriptor, so what
    was resolved is what gets mounted on (via /proc/self/fd/N): no window
    between check and use.
    """

    def __init__(self, path, display=None):
        self.path = display or path  # for messages
        self.fd = os.open(path, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._mnt_id = None

    @property
    def mnt_id(self):
        """The root's mount; only paths on it may be created."""
        if self._mnt_id is None:
            self._mnt_id = mount_id(self.fd)
        return self._mnt_id

    def open(self, path, create=False, strict=False):
        """Return an O_PATH fd for ``path`` inside the root, or raise.

        With ``create``, missing directories are made (mode 0755) but only
        on the image's own file system mount, never under another mount.
        ``strict`` (a user's bind destination) refuses, as ch-run does, what
        would lead outside the image if followed on the host: a ``..`` above
        the root, an absolute symlink; and the root itself.
        Raises FileNotFoundError if a component is missing (and not made),
        Fail for anything else.
        """
        todo = [c for c in reversed(path.split("/")) if c]
        stack = [os.dup(self.fd)]   # fds of the directories walked so far
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name == ".":
                    continue
                if name == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    elif strict:
                        raise Fail(f"{path}: not subdirectory of image "
                                   f"{self.path} ('..' above its root)")
                    continue
                parent = stack[-1]
                try:
                    fd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=parent)
                except FileNotFoundError:
                    if not create:
                        raise
                    if mount_id(parent) != self.mnt_id:
                        raise Fail(f"can't create {path}: it would be under "
                                   "another mount (a host directory)")
                    try:
                        os.mkdir(name, 0o755, dir_fd=parent)
                    except OSError as e:
                        raise Fail(f"can't create {path} in image: {e.strerror}")
                    fd = os.open(name, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=parent)
                if _is_symlink(fd):
                    target = os.readlink("", dir_fd=fd)  # this link, no other
                    os.close(fd)
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise Fail(f"can't resolve {path}: too many symlinks")
                    if target.startswith("/"):
                        if strict:
                            raise Fail(f"{path}: symlink not relative: "
                                       f"{name} -> {target}")
                        while len(stack) > 1:
                            os.close(stack.pop())
                    todo.extend(c for c in reversed(target.split("/")) if c)
                    continue
                if todo and not _is_dir(fd):
                    os.close(fd)
                    raise Fail(f"can't resolve {path}: {name} is not a directory")
                stack.append(fd)
            if strict and len(stack) == 1:
                raise Fail(f"{path}: not subdirectory of image {self.path} "
                           "(it is the image's root)")
            return stack.pop()
        except (FileNotFoundError, Fail):
            raise
        except OSError as e:
            raise Fail(f"can't resolve {path} in image: {e.strerror}")
        finally:
            for fd in stack:
                os.close(fd)

    def exists(self, path):
        try:
            os.close(self.open(path))
            return True
        except (FileNotFoundError, Fail):
            return False

    def locate(self, path):
        """Where a missing ``path`` would be: (the image path of its deepest
        existing directory, symlinks resolved inside the image, and the
        missing components after it); None if ``path`` exists."""
        todo = [c for c in reversed(path.split("/")) if c]
        names = []
        links = 0
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            if name == "..":
                if names:
                    names.pop()
                continue
            here = "/".join([*names, name])
            try:
                mode = os.stat(here, dir_fd=self.fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                rest = [name, *reversed(todo)]
                if ".." in rest:
                    raise Fail(f"can't make {path} in image: '..' after a missing directory")
                return "/".join(names), [c for c in rest if c != "."]
            except OSError as e:
                raise Fail(f"can't resolve {path} in image: {e.strerror}")
            if mode & 0o170000 == 0o120000:
                links += 1
                if links > MAX_SYMLINKS:
                    raise Fail(f"can't resolve {path}: too many symlinks")
                target = os.readlink(here, dir_fd=self.fd)
                if target.startswith("/"):
                    names = []
                todo.extend(c for c in reversed(target.split("/")) if c)
            elif todo and mode & 0o170000 != 0o040000:
                raise Fail(f"can't resolve {path}: {name} is not a directory")
            else:
                names.append(name)
        return None


def _is_symlink(fd):
    return (os.fstat(fd).st_mode & 0o170000) == 0o120000


def _is_dir(fd):
    return (os.fstat(fd).st_mode & 0o170000) == 0o040000


def mount_id(fd):
    """The mount ID of an open file (Linux >= 3.15 fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line[7:])
    raise Fail("can't read mount id from /proc/self/fdinfo")


def fd_path(fd):
    return f"/proc/self/fd/{fd}"


# ------------------------------------------------------------- the image ---

def image_name_to_dir(name):
    """A store name's directory name, as Charliecloud mangles it."""
    return name.replace("/", "%").replace(":", "+")


def default_storage():
    """Charliecloud's default store: /var/tmp/$USER.ch."""
    return f"/var/tmp/{_username(os.getuid())}.ch"


def find_image(ref, storage):
    """Return the image (a directory, or a SquashFS file: see
    :func:`is_squash`) for a path or a name in the store.

    An image found in the store is used only if the store is trusted (see
    :func:`trusted_dir`); a path is the caller's own choice."""
    if storage is None:
        storage = os.environ.get("CH_IMAGE_STORAGE") or default_storage()
    candidate = store_candidate(ref, storage)
    if candidate is not None:
        try:
            return trusted_store_image(storage, candidate, trusted_uids())
        except UntrustedPath as e:
            raise Fail(f"refusing image store {storage}: {e}")
    if os.path.isdir(ref):
        return os.path.realpath(ref)
    if os.path.isfile(ref):
        if not is_squash(ref):
            raise Fail(f"image {ref} is a file, but not a SquashFS image")
        return os.path.realpath(ref)
    raise Fail(f"image not found: {ref} (no such directory or file, and no "
               f"such image in store {storage})")


SQUASH_MAGIC = b"hsqs"  # a SquashFS superblock's first bytes (little-endian)
SQUASH_SUFFIX = ".sqfs"


def is_squash(path):
    """Whether ``path`` is a SquashFS file (by its magic number)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == SQUASH_MAGIC
    except OSError:
        return False


def store_candidate(ref, storage):
    """The store's image of name ``ref``, if there is one: its SquashFS
    file (``img/NAME.sqfs``, see ``chspawner images squash``), or else its
    directory. A name in the store wins over a path, as in ch-run; ".."
    can't be in a name."""
    if "/.." not in f"/{ref}" and not ref.startswith("/") and ref:
        candidate = os.path.join(storage, "img", image_name_to_dir(ref))
        if not ref.endswith(SQUASH_SUFFIX) and os.path.isfile(candidate + SQUASH_SUFFIX):
            return candidate + SQUASH_SUFFIX
        if os.path.isdir(candidate):
            return candidate
    return None


# ---------------------------------------------------- trusting a store ---
#
# The default store, /var/tmp/$USER.ch, is in a directory anyone can write:
# another user could make it first (or a symlink of that name) and fill it
# with programs its victim would run as themselves. So, as ssh does with
# ~/.ssh, a store is trusted only if nobody else could have put it where it
# is or can change it now. Metadata only: a few lstat(2)s, no tree walks.

S_IFMT, S_IFDIR, S_IFLNK, S_IFREG, S_ISVTX = 0o170000, 0o040000, 0o120000, 0o100000, 0o1000


class UntrustedPath(Exception):
    """A store directory someone else made or can write; one line."""


def trusted_uids(owner=None):
    """Who may own what sits in a directory others can write: the caller,
    root, and ``owner`` (the user whose store root is reading). None (any
    owner) for root with no owner named: root only lists and inspects;
    whoever runs an image checks the store as themselves."""
    uid = os.getuid()
    if owner is None and uid == 0:
        return None
    return {uid, 0} | ({owner} if owner is not None else set())


def _loose(st):
    """Writable by group or others."""
    return st.st_mode & 0o022


def trusted_dir(path, trusted):
    """Resolve directory ``path`` component by component with lstat(2),
    refusing anything another user could have planted or can change; return
    the real path, or None if it doesn't exist.

    Trusted: an entry (directory or symlink) in a directory only its owner
    may write, whoever owns it (that owner, or root, put it there); in a
    sticky directory anyone may write (/tmp, /var/tmp), only one owned by a
    uid in ``trusted`` (None: any). Refused: a path through a non-sticky
    directory others may write, and a final directory group or others may
    write."""
    return _trusted_walk(os.path.abspath(path), "/", os.lstat("/"), trusted)


def _trusted_walk(path, here, here_st, trusted):
    """trusted_dir's walk of ``path`` from directory ``here`` (already
    trusted, with lstat ``here_st``); a relative ``path`` starts there."""
    todo = [c for c in reversed(path.split("/")) if c]
    if path.startswith("/"):
        here, here_st = "/", os.lstat("/")
    links = 0
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            here = os.path.dirname(here)
            here_st = os.lstat(here)
            continue
        entry = os.path.join(here, name)
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UntrustedPath(f"can't check {entry}: {e.strerror}")
        is_link = (st.st_mode & S_IFMT) == S_IFLNK
        if _loose(here_st):
            if not here_st.st_mode & S_ISVTX:
                raise UntrustedPath(f"{here} is writable by others and not sticky, "
                                    f"so anyone can replace {entry}")
            if trusted is not None and st.st_uid not in trusted:
                what = "a symlink made" if is_link else "made"
                raise UntrustedPath(
                    f"{entry} is {what} by {_username(st.st_uid)}, not you, in {here}, "
                    "which anyone can write (have it removed, or use another store: "
                    "-s DIR or CH_IMAGE_STORAGE)")
        if is_link:
            links += 1
            if links > MAX_SYMLINKS:
                raise UntrustedPath(f"can't resolve {path}: too many symlinks")
            target = os.readlink(entry)
            if target.startswith("/"):
                here, here_st = "/", os.lstat("/")
            todo.extend(c for c in reversed(target.split("/")) if c)
            continue
        if (st.st_mode & S_IFMT) != S_IFDIR:
            raise UntrustedPath(f"{entry} is not a directory")
        here, here_st = entry, st
    if _loose(here_st):
        raise UntrustedPath(f"{here} is writable by group or others "
                            f"(chmod go-w {here}, if it is yours)")
    return here


def trusted_store_image(storage, image_dir, trusted):
    """The real path of ``image_dir`` in store ``storage``, if the store, its
    img/ and the image directory are trusted, or raise UntrustedPath. The
    image must also belong to the store's owner (or a trusted uid): in a
    trusted img/, nobody else could have made it, unless img/ was once open."""
    root = trusted_dir(storage, trusted)
    if root is None:
        raise UntrustedPath(f"{image_dir} vanished")
    root_st = os.lstat(root)
    # From the checked root on, relative to it: a few more lstats, not walks.
    # Open tmp/ or dlcache/ mean the store was tampered with.
    for sub in ("img", "tmp", "dlcache"):
        _trusted_walk(sub, root, root_st, trusted)
    relative = os.path.relpath(image_dir, storage)
    if relative.endswith(SQUASH_SUFFIX):  # a file in img/: img/ walked above
        image = os.path.join(root, relative)
        try:
            st = os.lstat(image)
        except FileNotFoundError:
            raise UntrustedPath(f"{image_dir} vanished")
        if (st.st_mode & S_IFMT) != S_IFREG:
            raise UntrustedPath(f"{image} is not a regular file")
        if _loose(st):
            raise UntrustedPath(f"{image} is writable by group or others "
                                f"(chmod go-w {image}, if it is yours)")
        if not is_squash(image):
            raise UntrustedPath(f"{image} is not a SquashFS image")
    else:
        image = _trusted_walk(relative, root, root_st, trusted)
    if image is None:
        raise UntrustedPath(f"{image_dir} vanished")
    uid = os.lstat(image).st_uid
    if trusted is not None and uid not in trusted and uid != root_st.st_uid:
        raise UntrustedPath(f"image {image} belongs to {_username(uid)}, "
                            "not to you or the store's owner")
    return image


def _username(uid):
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return os.environ.get("USER") or str(uid)


# ----------------------------------------------------------- environment ---

def parse_env_line(line, where):
    """One ch-run --set-env assignment: NAME=VALUE, one pair of '' stripped."""
    name, eq, value = line.partition("=")
    if not eq:
        raise Fail(f"--set-env: {where}: no '=' in {line!r}")
    if not name:
        raise Fail(f"--set-env: {where}: empty variable name in {line!r}")
    if len(value) >= 2 and value[0] == "'" and value[-1] == "'":
        value = value[1:-1]
    return name, value


def expand_value(value, env):
    """ch-run's expansion: each ':'-item "$NAME" becomes NAME's value, or is
    dropped (with its colon) when NAME is unset or empty."""
    if "$" not in value:
        return value
    items = []
    for item in value.split(":"):
        if item.startswith("$") and len(item) > 1:  # a lone "$" stays
            item = env.get(item[1:], "")
            if not item:
                continue
        items.append(item)
    return ":".join(items)


def read_env_file(path, where):
    try:
        with open(path, "rb") as f:
            text = os.fsdecode(f.read())
    except OSError as e:
        raise Fail(f"--set-env: can't read {where}: {e.strerror}")
    return [parse_env_line(line, f"{where}:{n}")
            for n, line in enumerate(text.split("\n"), 1) if line]


def resolve_devices(o, log):
    """--device/--devices: read the CDI specs and choose the devices (on
    the host, before the namespaces); their environment takes the options'
    place in ``o.env_ops``. Returns the devices' edits, or None."""
    if not o.devices:
        return None
    if __package__:
        from . import cdi
    else:  # run as a script (launch.py): a sibling module
        import cdi
    dirs = cdi.default_dirs(os.environ) if o.cdi_dirs is None else \
        [d for d in o.cdi_dirs.split(":") if d]
    try:
        registry = cdi.Registry(dirs, os.environ)
        ops = []
        for op, arg in o.env_ops:
            if op == "device":
                ops.append(("literal", registry.request(arg)))
            elif op == "devices":
                ops.append(("literal", registry.request_all()))
            else:
                ops.append((op, arg))
        edits = registry.edits
        edits.add_library_links()
    except cdi.CdiError as e:
        raise Fail(str(e))
    o.env_ops = ops
    for warning in edits.warnings:
        if not o.quiet:
            sys.stderr.write(f"{PROG}: warning: {warning}\n")
    for note in edits.notes:
        log(1, note)
    return edits


def read_host_env_files(o):
    """Read --set-env=FILE files now, while host paths are still visible."""
    o.env_ops = [("pairs", read_env_file(arg, arg)) if op == "file"
                 else (op, arg) for op, arg in o.env_ops]


def build_env(o, libc, host_env, username):
    """The command's environment: ch-run's default tweaks, then --set-env and
    --unset-env in command-line order, then CH_RUNNING."""
    env = dict(host_env)
    if o.home:
        env["HOME"] = f"/home/{username}"
    path = env.get("PATH")
    if path is None:  # left unset, as ch-run does (execvp searches /bin:/usr/bin)
        if not o.quiet:
            sys.stderr.write(f"{PROG}: warning: $PATH not set\n")
    elif "/bin" not in path.split(":"):
        env["PATH"] = f"{path}:/bin"
    env.pop("TMPDIR", None)
    for op, arg in o.env_ops:
        if op == "unset":
            for name in [n for n in env if libc.fnmatch(arg, n)]:
                del env[name]
            continue
        if op == "literal":  # a CDI device's: set as given
            env.update(arg)
            continue
        if op == "set":
            pairs = [parse_env_line(arg, "argument")]
        elif op == "pairs":
            pairs = arg
        else:  # "image": ch/environment, read inside the container's root
            pairs = read_env_file("/ch/environment", "image's /ch/environment")
        for name, value in pairs:
            env[name] = expand_value(value, env) if o.env_expand else value
    env["CH_RUNNING"] = CH_RUNNING
    return env


# ----------------------------------------------------------- the container -

REQUIRED_DIRS = ("dev", "proc", "sys", "tmp")
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/machine-id")


class Container:
    """Sets up one container; ``enter()`` leaves us inside it."""

    def __init__(self, o, image_dir, libc, log, devices=None):
        self.o = o
        self.image_dir = image_dir
        self.libc = libc
        self.log = log
        self.devices = devices   # CDI edits (cdi.Edits), or None
        self.scratch = None      # fd of the tmpfs that holds the overlay's layers
        self.uid, self.gid = os.getuid(), os.getgid()
        self.cuid = self.uid if o.uid is None else o.uid
        self.cgid = self.gid if o.gid is None else o.gid
        self.username = os.environ.get("USER") or _username(self.uid)
        self.squash = os.path.isfile(image_dir)

    def check_image(self, root):
        missing = [f"/{d}" for d in REQUIRED_DIRS if not root.exists(d)]
        if self.o.passwd:
            missing += [f"/etc/{f}" for f in ("passwd", "group")
                        if not root.exists(f"etc/{f}")]
        if missing:
            raise Fail(f"image {root.path} is broken: missing "
                       f"{', '.join(missing)}")

    def enter_namespaces(self):
        self.libc.unshare(self.libc.CLONE_NEWUSER | self.libc.CLONE_NEWNS)
        _write("/proc/self/uid_map", f"{self.cuid} {self.uid} 1")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", f"{self.cgid} {self.gid} 1")
        # Keep our mounts from propagating anywhere (and theirs from us).
        self.libc.mount(None, "/", None, self.libc.MS_REC | self.libc.MS_PRIVATE,
                        None, "can't make / private")

    def bind(self, src, root, dst, readonly=False, create=False, strict=False):
        """Bind host ``src`` at ``dst`` resolved inside ``root`` (``strict``:
        see Root.open)."""
        lib = self.libc
        try:
            fd = root.open(dst, create=create, strict=strict)
        except FileNotFoundError:
            hint = "" if create else " (use -w or -W to create it)"
            raise Fail(f"can't bind {src}: destination not found in image: "
                       f"{dst}{hint}")
        except Fail as e:
            raise Fail(f"can't bind {src}: {e}")
        try:
            self.log(2, f"bind {src} -> {dst}{' (read-only)' if readonly else ''}")
            lib.mount(src, fd_path(fd), None, lib.MS_BIND | lib.MS_REC, None,
                      f"can't bind {src} to {dst}")
        finally:
            os.close(fd)
        if readonly:
            # MS_RDONLY is ignored by a new bind: remount the new mount, which
            # a fresh lookup finds on top of what ``fd`` still points to.
            fd = root.open(dst)
            try:
                lib.mount(None, fd_path(fd), None,
                          lib.MS_REMOUNT | lib.MS_BIND | lib.MS_RDONLY
                          | _locked_flags(src), None,
                          f"can't make {dst} read-only")
            finally:
                os.close(fd)

    def mount_root(self):
        """Make the image (or a writable overlay of it) a mount of its own,
        read-only unless -w; return its Root."""
        lib, o, image = self.libc, self.o, self.image_dir
        if self.squash and self.warm is not None and self.warm.joined:
            root = Root(self.squash_point, display=image)  # mounted, warm
        elif self.squash:
            root = self.mount_squash()
            if self.warm is not None:
                self.warm.keep(lib)
                # (our own mount namespace now: the mount's copy in it)
                os.close(root.fd)
                root = Root(self.squash_point, display=image)
        else:
            lib.mount(image, image, None, lib.MS_BIND | lib.MS_REC, None,
                      f"can't bind image {image}")
            if not o.writable:
                lib.mount(None, image, None, lib.MS_REMOUNT | lib.MS_BIND
                          | lib.MS_RDONLY | _locked_flags(image), None,
                          f"can't make image read-only: {image}")
            root = Root(image)
        self.check_image(root)
        layer = self.device_layer(root)
        cache = self.devices is not None and bool(self.devices.ldcache)
        if o.write_fake is None and not layer and not cache:
            return root
        # An overlay: -W's writable tmpfs on top, and/or the layer that
        # adds what the devices need that the image lacks (mount points,
        # links), read-only. The tmpfs that holds them is mounted on the
        # image's /dev, which host /dev covers later anyway; overlayfs sees
        # the image's own (empty) /dev through lowerdir. All paths go
        # through file descriptors: no ':' or ',' from the image path can
        # reach the mount options.
        size = f"size={o.write_fake}," if o.write_fake else ""
        self.mount_tmpfs(root, "dev", f"{size}mode=0700",
                         "for --write-fake" if o.write_fake is not None else "for devices")
        scratch = root.open("dev")
        try:
            tmp = fd_path(scratch)
            if cache:
                # The image's library cache, rebuilt in the container
                # (update_ldcache), is written here.
                _write(f"{tmp}/ld.so.cache", "", create=True)
                self.scratch, scratch = scratch, None
            if o.write_fake is None and not layer:
                return root
            os.mkdir(f"{tmp}/merged", 0o700)
            lower = fd_path(root.fd)
            if layer:
                # Below the image: the image's directories keep their own
                # owners and modes; only what the image lacks shows.
                self.make_layer(f"{tmp}/layer", layer)
                lower = f"{lower}:{tmp}/layer"
            options = f"lowerdir={lower},userxattr"
            if o.write_fake is not None:
                for d in ("upper", "work"):
                    os.mkdir(f"{tmp}/{d}", 0o700)
                options += f",upperdir={tmp}/upper,workdir={tmp}/work,volatile"
            lib.mount("overlay", f"{tmp}/merged", "overlay", 0, options,
                      "can't mount overlayfs for " +
                      ("--write-fake" if o.write_fake is not None else "devices"))
            merged = Root(f"{tmp}/merged", display=root.path)
        finally:
            if scratch is not None:
                os.close(scratch)
        os.close(root.fd)
        return merged

    # Image directories that host mounts cover in the container: what a
    # device needs there must be on the host.
    HOST_COVERED = ("dev", "proc", "sys", "tmp")

    def device_layer(self, root):
        """What the devices need that the image lacks, outside the host's
        mounts: [(where, missing components, kind, link target)], kind
        "dir", "file" or "link"."""
        devices = self.devices
        if devices is None:
            return []
        wanted = [(path, "dir" if os.path.isdir(host) else "file", None)
                  for host, path, _ in devices.mounts]
        wanted += [(path, "file", None) for _, path in devices.nodes]
        wanted += [(link, "link", target) for target, link in devices.links]
        if devices.ldcache:
            wanted.append(("/etc/ld.so.cache", "file", None))
        layer = []
        for path, kind, target in wanted:
            where = root.locate(path)
            if where is None:
                continue
            base, missing = where
            if base.split("/")[0] in self.HOST_COVERED or \
                    (not base and missing[0] in self.HOST_COVERED):
                if kind == "link":
                    self.log(1, f"device link {path} -> {target}: not in the host's "
                                f"/{missing[0] if not base else base.split('/')[0]}, left out")
                continue  # (a missing bind destination there fails in bind())
            layer.append((base, missing, kind, target))
        return layer

    def make_layer(self, layer, entries):
        """Make the overlay layer ``layer``: each missing path, at the place
        in the image where its deepest existing directory is."""
        for base, missing, kind, target in entries:
            here = "/".join([layer, *(p for p in base.split("/") if p), *missing[:-1]])
            os.makedirs(here, 0o755, exist_ok=True)
            leaf = f"{here}/{missing[-1]}"
            if os.path.lexists(leaf):
                continue
            self.log(2, f"device {kind} {'/'.join([base, *missing])} made in an overlay")
            if kind == "dir":
                os.mkdir(leaf, 0o755)
            elif kind == "link":
                os.symlink(target, leaf)
            else:
                _write(leaf, "", create=True)

    def bind_devices(self, root):
        """Bind the devices' nodes and host files (read-only unless the spec
        says rw), and the rebuilt library cache over the image's."""
        devices = self.devices
        for host, path in devices.nodes:
            if not root.exists(path):  # (the layer made those outside /dev)
                raise Fail(f"can't bind device node {host} at {path}: the container's /dev "
                           f"is the host's, which has no {path}")
            self.bind(host, root, path)
        for host, path, readonly in devices.mounts:
            self.bind(host, root, path, readonly=readonly)
        if self.scratch is not None:
            self.bind(f"{fd_path(self.scratch)}/ld.so.cache", root, "etc/ld.so.cache",
                      readonly=True)

    def update_ldcache(self):
        """CDI's update-ldcache, done without running the hook: the image's
        own ldconfig builds the image's cache with the devices' library
        folders added, in our tmpfs (the image stays read-only), and the
        cache is copied to the file bound over /etc/ld.so.cache. Soname
        links were made in the overlay (cdi.Edits.add_library_links)."""
        folders = self.devices.ldcache
        ldconfig = next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig")
                         if os.access(p, os.X_OK)), None)
        if ldconfig is None:
            raise Fail("the image has no ldconfig to add the devices' libraries "
                       f"({', '.join(folders)}) to its cache")
        scratch = fd_path(self.scratch)
        self.log(2, f"{ldconfig} -X -C (tmpfs) {' '.join(folders)}")
        pid = os.fork()
        if pid == 0:
            try:
                os.set_inheritable(self.scratch, True)
                null = os.open("/dev/null", os.O_WRONLY)
                os.dup2(null, 1)
                os.execve(ldconfig, [ldconfig, "-X", "-C", f"{scratch}/new", *folders],
                          {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise Fail(f"{ldconfig} in the image failed (wait status {status}) adding "
                       f"the devices' libraries ({', '.join(folders)}) to its cache")
        with open(f"{scratch}/new", "rb") as new, open(f"{scratch}/ld.so.cache", "wb") as cache:
            cache.write(new.read())
        os.close(self.scratch)
        self.scratch = None

    def mount_squash(self):
        """Mount the SquashFS image at the mount point, served by
        ``squashfuse_ll`` (see :func:`start_squash_server`); its Root."""
        lib, image = self.libc, self.image_dir
        server = find_program("squashfuse_ll")
        if server is None:
            raise Fail(f"can't mount SquashFS image {image}: squashfuse_ll not found "
                       "in $PATH (Debian's package squashfuse)")
        point = self.squash_point
        # Opened in our user namespace: the kernel takes a FUSE mount's
        # device only from the namespace the mount belongs to.
        try:
            fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise Fail(f"can't mount SquashFS image {image}: /dev/fuse: {e.strerror}")
        try:
            go = start_squash_server(server, image, fuse, lib)
            self.log(2, f"mount {image} at {point} (squashfuse_ll)")
            lib.mount("squashfuse", point, "fuse.squashfuse",
                      lib.MS_RDONLY | lib.MS_NOSUID | lib.MS_NODEV,
                      f"fd={fuse},rootmode=40000,user_id={self.cuid},group_id={self.cgid}",
                      f"can't mount SquashFS image {image}")
        finally:
            os.close(fuse)  # (the server has its own copy)
        go()
        try:
            root = Root(point, display=image)
            os.stat(fd_path(root.fd))  # (the server's first answer)
            return root
        except OSError as e:  # the server failed on the file
            raise Fail(f"can't read SquashFS image {image}: {e.strerror}")

    def write_passwd(self, root):
        """Bind generated /etc/passwd and /etc/group, made in a tmpfs that is
        detached right away: nothing is ever written to the host."""
        lib = self.libc
        cuid, cgid = self.cuid, self.cgid
        # As ch-run: root, nobody, and the container's IDs named as on the
        # host (65534: nobody/nogroup), else charlie/charliegroup. Your own
        # uid is you, with your home.
        if cuid == self.uid:
            home = "/home/" + self.username if self.o.home else \
                os.environ.get("HOME", "/")
            user = f"{self.username}:x:{cuid}:{cgid}::{home}:/bin/sh"
        elif cuid == 0:
            user = f"root:x:0:{cgid}:root:/root:/bin/sh"
        else:
            name, gecos = _host_user(cuid)
            user = f"{name}:x:{cuid}:{cgid}:{gecos}:/:/bin/sh"
        passwd = ["root:x:0:0:root:/root:/bin/sh"] if cuid != 0 else []
        if cuid != 65534:
            passwd.append("nobody:x:65534:65534:nobody:/:/bin/false")
        passwd.append(user)
        group = ["root:x:0:"] if cgid != 0 else []
        if cgid != 65534:
            group.append("nogroup:x:65534:")
        group.append(f"{_host_group(cgid)}:x:{cgid}:")
        # The image's /dev is the scratch mount point: host /dev covers it
        # later anyway. Re-open by name to get the tmpfs, not what's below.
        self.mount_tmpfs(root, "dev", "size=1m,mode=0755", "for /etc/passwd")
        tmpfs = root.open("dev")
        try:
            tmpfs_path = fd_path(tmpfs)
            for name, lines in (("passwd", passwd), ("group", group)):
                src = f"{tmpfs_path}/{name}"
                _write(src, "\n".join(lines) + "\n", create=True)
                self.bind(src, root, f"etc/{name}", readonly=True)
            lib.umount(tmpfs_path, "can't detach passwd tmpfs")
        finally:
            os.close(tmpfs)

    def mount_tmpfs(self, root, dst, options, purpose=None):
        fd = root.open(dst)
        try:
            self.libc.mount("tmpfs", fd_path(fd), "tmpfs", 0, options,
                            f"can't mount tmpfs {purpose or f'at /{dst}'}")
        finally:
            os.close(fd)

    def setup_home(self, root):
        """--home: a tmpfs over /home holding /home/$USER, bound to $HOME."""
        host_home = os.environ.get("HOME")
        if not host_home or not os.path.isdir(host_home):
            raise Fail(f"--home: host $HOME is not a directory: {host_home!r}")
        try:
            self.mount_tmpfs(root, "home", "mode=0755")
        except FileNotFoundError:
            raise Fail(f"--home: image has no /home: {root.path}")
        home_tmpfs = root.open("home")
        try:
            os.mkdir(f"{fd_path(home_tmpfs)}/{self.username}", 0o755)
        finally:
            os.close(home_tmpfs)
        self.bind(host_home, root, f"home/{self.username}")

    def pivot(self, root):
        lib = self.libc
        os.fchdir(root.fd)
        os.close(root.fd)
        err = lib.pivot_root(".", ".")
        if err == 0:
            # The old root is now stacked on top of the new one; drop it.
            lib.umount(".", "can't detach old root")
        elif err == 22:  # EINVAL: old root is a rootfs (initramfs); move.
            lib.mount(".", "/", None, lib.MS_MOVE, None, "can't move new root")
            os.chroot(".")
        else:
            raise Fail(f"can't pivot_root(2) into {root.path}: {os.strerror(err)}")
        os.chdir("/")

    def enter(self):
        o = self.o
        if self.squash and o.writable:
            raise Fail(f"a SquashFS image can't be mounted read-write: {self.image_dir} "
                       "(use -W for a writable overlay)")
        self.warm = None
        if self.squash:  # (checked as ourselves, before the namespaces)
            self.squash_point = squash_mount_point(o)
            linger = squash_linger()
            if linger:
                self.warm = WarmMount(self.image_dir, self.squash_point, self.cuid,
                                      self.cgid, linger, self.log)
        if self.warm is None or not self.warm.join(self.libc):
            self.enter_namespaces()
        try:
            root = self.mount_root()
        finally:
            if self.warm is not None:
                self.warm.release()
        for src in ("/dev", "/proc", "/sys"):
            self.bind(src, root, src)
        for src in HOST_FILES:
            if os.path.exists(src) and root.exists(src):
                self.bind(src, root, src, readonly=True)
        if o.passwd:
            self.write_passwd(root)
        if o.private_tmp:
            self.mount_tmpfs(root, "tmp", "mode=1777")
        else:
            self.bind(os.environ.get("TMPDIR") or "/tmp", root, "tmp")
        if o.home:
            self.setup_home(root)
        if self.devices is not None:
            self.bind_devices(root)
        create = o.writable or o.write_fake is not None
        for src, dst in o.binds:
            if not os.path.exists(src):
                raise Fail(f"can't bind: source not found: {src}")
            self.bind(src, root, dst, create=create, strict=True)
        self.pivot(root)
        if self.scratch is not None:
            self.update_ldcache()


def find_program(name):
    """The path of program ``name`` in the host's $PATH, or None."""
    for d in (os.environ.get("PATH") or "/usr/bin:/bin").split(":"):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None


def squash_mount_point(o):
    """Where a SquashFS image is mounted (in our own mount namespace: the
    host never sees it, and concurrent containers share the directory).
    ``-m DIR`` must exist; the default, ch-run's /var/tmp/$USER.ch/mnt, is
    made if needed, and used only if nobody else could have put it there."""
    if o.mount is not None:
        if not os.path.isdir(o.mount):
            raise Fail(f"SquashFS mount point is not a directory: {o.mount}")
        return os.path.realpath(o.mount)
    base = f"/var/tmp/{_username(os.getuid())}.ch"
    point = base + "/mnt"
    for d in (base, point):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise Fail(f"can't make SquashFS mount point {d}: {e.strerror} (use -m DIR)")
        try:
            if trusted_dir(d, trusted_uids()) is None:
                raise Fail(f"SquashFS mount point {d} vanished")
        except UntrustedPath as e:
            raise Fail(f"refusing SquashFS mount point {d}: {e} (use -m DIR)")
    return point


LINGER_ENV = "CHSPAWNER_SQUASH_LINGER"


def squash_linger():
    """$CHSPAWNER_SQUASH_LINGER: seconds a SquashFS image's mount stays warm
    after its last start (0, the default: not kept at all)."""
    text = os.environ.get(LINGER_ENV, "")
    try:
        linger = float(text) if text else 0.0
    except ValueError:
        linger = -1.0
    if not 0 <= linger < 1e9:
        raise Fail(f"${LINGER_ENV}: not a number of seconds: {text!r}")
    return linger


class WarmMount:
    """A SquashFS image's mount kept warm between containers
    ($CHSPAWNER_SQUASH_LINGER seconds after the last start).

    Each container otherwise mounts its image afresh, and a fresh FUSE
    mount has cold caches: every lookup and read of a start is a round trip
    to ``squashfuse_ll``. Here the first start's mount is kept by a
    *keeper*, a process left in the namespaces the mount was made in (the
    user namespace, and the mount namespace with nothing but the host's
    mounts and the image); a later start of the same image (same file, same
    container IDs, same mount point) joins those namespaces and takes a
    mount namespace of its own from them, with the mount in it, warm.
    The keeper exits once ``linger`` seconds pass without a start; the
    mount then lives on as long as any container using it, and its server
    exits with the last. Starts meet in a record in the user's private
    rendezvous directory (:func:`join_dir`), flock(2)ed while a start
    decides, so concurrent first starts make one mount.
    """

    def __init__(self, image, point, cuid, cgid, linger, log):
        st = os.stat(image)
        spot = point.replace("%", "%25").replace("/", "%2F")
        self.name = f"chspawner-squash.{st.st_dev}.{st.st_ino}.{st.st_mtime_ns}." \
                    f"{cuid}.{cgid}.{spot}"[:255]
        self.linger, self.log = linger, log
        self.joined = False
        self.dir_fd, self.fd = locked_record(self.name)

    def join(self, libc):
        """Enter the keeper's namespaces, then a mount namespace of our own
        copied from its; False (nothing changed) if there is no keeper."""
        record = os.pread(self.fd, 64, 0).split()
        if len(record) != 2:
            return False
        pid, started = int(record[0]), record[1]
        try:
            user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if _start_time(pid) != started:  # gone, its PID reused since
                return False
            libc.setns(user, "the image's warm user namespace")
            libc.setns(mnt, "the image's warm mount namespace")
        finally:
            os.close(user)
            os.close(mnt)
        libc.unshare(libc.CLONE_NEWNS, "a mount namespace")
        os.utime(self.name, dir_fd=self.dir_fd)   # used now: the keeper stays on
        self.log(1, f"SquashFS image mounted already (kept by process {pid})")
        self.joined = True
        return True

    def keep(self, libc):
        """Just mounted, in fresh namespaces: leave a keeper in them, and
        go on in a mount namespace of our own."""
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.close(ready_r)
                os.setsid()
                if os.fork() == 0:
                    self._keeper(libc, ready_w)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.waitpid(child, 0)
        record = os.read(ready_r, 64)
        os.close(ready_r)
        if record:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, record, 0)
            os.utime(self.name, dir_fd=self.dir_fd)
            self.log(1, f"SquashFS mount kept {self.linger:g} s after the last start "
                        f"by process {record.split()[0].decode()}")
        libc.unshare(libc.CLONE_NEWNS, "a mount namespace")

    def _keeper(self, libc, ready):
        """The keeper: hold the namespaces until ``linger`` seconds pass
        without a start, then remove the record and exit."""
        import fcntl
        import time
        libc.c.prctl(15, b"chspawner-mount", 0, 0, 0)  # PR_SET_NAME: what ps shows
        os.chdir("/")
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        low = 3   # every other descriptor closed: none of the command's
        for keep in sorted((ready, self.dir_fd)):
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, 1 << 16)
        pid = os.getpid()
        me = b"%d %s\n" % (pid, _start_time(pid))
        os.write(ready, me)
        os.close(ready)
        while True:
            try:
                used = os.stat(self.name, dir_fd=self.dir_fd).st_mtime
            except OSError:
                return   # the record is gone: so are we
            wait = used + self.linger - time.time()
            if wait > 0:
                time.sleep(wait)
                continue
            fd = os.open(self.name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self.dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)   # no start is deciding now
                st = os.fstat(fd)
                if st.st_mtime + self.linger <= time.time() or os.pread(fd, 64, 0) != me:
                    if os.pread(fd, 64, 0) == me:
                        os.unlink(self.name, dir_fd=self.dir_fd)
                    return
            finally:
                os.close(fd)

    def release(self):
        """Done deciding: let the next start (or the keeper) look. A record
        no keeper wrote (this start failed) is removed."""
        if self.fd is None:
            return
        if not self.joined and not os.pread(self.fd, 64, 0):
            os.unlink(self.name, dir_fd=self.dir_fd)
        os.close(self.fd)
        os.close(self.dir_fd)
        self.fd = None


def start_squash_server(server, image, fuse, libc):
    """Start ``squashfuse_ll`` serving ``image`` on FUSE device ``fuse``,
    detached from us: it is not our child once this returns, not in our
    session (a Ctrl-C for the command doesn't end it) and, in a mount
    namespace of its own, doesn't hold the image's mount. So the mount
    lives exactly as long as the container's mount namespace, that is as
    long as any process of the container; when the last one exits, the
    kernel drops the mount, the FUSE device ends, and the server exits.

    The server waits until the caller has mounted (a FUSE device serves
    only once it is mounted): returns ``go()``, to call after mount(2);
    it raises Fail if the server could not be started."""
    go_r, go_w = os.pipe()
    status_r, status_w = os.pipe()  # (close-on-exec: EOF once it execs)
    pid = os.fork()
    if pid == 0:  # (the child: it reports through status_w, never returns)
        try:
            os.close(go_w)
            os.close(status_r)
            libc.unshare(libc.CLONE_NEWNS, "a mount namespace for squashfuse_ll")
            if os.fork():
                os._exit(0)
            os.setsid()
            os.chdir("/")
            if os.read(go_r, 1) != b"!":
                os._exit(0)  # the launcher failed before mounting
            # Never hold the command's terminal or pipes open: a caller
            # reading its output to the end would wait for us.
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.set_inheritable(fuse, True)
            os.execv(server, [server, "-f", image, f"/dev/fd/{fuse}"])
        except BaseException as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            try:
                os.write(status_w, f"can't start {server}: {why}".encode())
            finally:
                os._exit(1)
        os._exit(1)
    os.close(go_r)
    os.close(status_w)
    os.waitpid(pid, 0)  # (it exits at once; its child serves)

    def go():
        try:
            os.write(go_w, b"!")
        finally:
            os.close(go_w)
        failed = os.read(status_r, 512)
        os.close(status_r)
        if failed:
            raise Fail(f"can't mount SquashFS image {image}: {failed.decode(errors='replace')}")
    return go


def _host_user(uid):
    """(name, gecos) of host user ``uid``, or ch-run's stand-in."""
    import pwd
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return "charlie", "Charlie"
    return entry.pw_name, entry.pw_gecos


def _host_group(gid):
    """The host's name of group ``gid``, or ch-run's stand-in."""
    import grp
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return "root" if gid == 0 else "charliegroup"


def _write(path, text, create=False):
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# ------------------------------------------------------------------ join ---

JOIN_COUNT_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE",
                   "SLURM_CPUS_ON_NODE")


def join_peer_count(o):
    """ch-run's rule: --join-ct, else the first of JOIN_COUNT_VARS that is
    set (even if empty), read as strtol(3) does ("4(x2)" is 4); the count
    must be positive."""
    count, source = o.join_ct, "--join-ct"
    if count is None:
        for var in JOIN_COUNT_VARS:
            if var in os.environ:
                count = parse_int(os.environ[var], f"--join: {var}", extra_ok=True)
                source = var
                break
    if count is None:
        raise Fail("--join: no peer group size: give --join-ct or set "
                   "OMPI_COMM_WORLD_LOCAL_SIZE, SLURM_STEP_TASKS_PER_NODE or "
                   "SLURM_CPUS_ON_NODE")
    if count < 1:
        raise Fail(f"--join: no valid peer group size: {source} is {count}")
    return count


def join_tag(o):
    """--join-tag, else $SLURM_STEP_ID if set, else the parent's PID; an
    empty tag is an error (as in ch-run). Made safe for a file name."""
    if o.join_tag is not None:
        tag, source = o.join_tag, "--join-tag"
    elif "SLURM_STEP_ID" in os.environ:
        tag, source = os.environ["SLURM_STEP_ID"], "SLURM_STEP_ID"
        # Each job's steps count from 0: with the job's ID, two jobs of the
        # user on one node never meet (ch-run's tag is the step's alone).
        if tag and os.environ.get("SLURM_JOB_ID"):
            tag = f"{os.environ['SLURM_JOB_ID']}.{tag}"
    else:
        tag, source = str(os.getppid()), None
    if not tag:
        raise Fail(f"--join: peer group tag can't be empty (from {source})")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)


def join_namespaces(libc, pid):
    """setns(2) into the user and mount namespaces of ``pid``."""
    for ns in ("user", "mnt"):
        try:
            fd = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise Fail(f"can't join process {pid}: {e.strerror}")
        try:
            libc.setns(fd, f"{ns} namespace of process {pid}")
        finally:
            os.close(fd)


def private_dir(path, create):
    """An O_RDONLY fd for directory ``path`` if it is the caller's own and
    closed to others (made 0700 first with ``create``), else None. Never
    follows a symlink: in /dev/shm anyone can plant one."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.close(fd)
        return None
    return fd


def join_dir():
    """(fd, path) of the private directory the peers rendezvous in.

    A name anyone could take first (in /dev/shm) would let another user deny
    or hijack the join, so the lock lives in a directory only the caller can
    write: $XDG_RUNTIME_DIR (made by the system for each user) if there is
    one, else /dev/shm/chspawner-UID (or in $CHSPAWNER_JOIN_DIR), made 0700
    and checked to be ours. If someone else took that name first, fail
    clearly: peers must all pick the same place, so there is no other
    guessable name to fall back on."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        fd = private_dir(runtime, create=False)
        if fd is not None:
            return fd, runtime
    base = os.environ.get("CHSPAWNER_JOIN_DIR", DEFAULT_JOIN_DIR)
    path = os.path.join(base, f"chspawner-{os.getuid()}")
    fd = private_dir(path, create=True)
    if fd is None:
        try:
            st = os.lstat(path)
            why = (f"it belongs to {_username(st.st_uid)}"
                   if st.st_uid != os.getuid() else "it is not a private directory")
        except OSError as e:
            why = e.strerror
        raise Fail(f"--join: can't use {path}: {why} (have it removed, or set "
                   "XDG_RUNTIME_DIR to a private directory of yours)")
    return fd, path


def locked_record(name, what=""):
    """(directory fd, fd) of the record ``name`` in the private rendezvous
    directory (:func:`join_dir`), made if missing, flock(2)ed: the peers
    of a join, or the starts of a warm mount, decide one at a time.
    ``what`` starts the messages."""
    import fcntl
    dir_fd, where = join_dir()
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
    except OSError as e:
        os.close(dir_fd)
        raise Fail(f"{what}can't open {where}/{name}: {e.strerror}")
    if os.fstat(fd).st_uid != os.getuid():  # only root could have made it
        os.close(fd)
        os.close(dir_fd)
        raise Fail(f"{what}{where}/{name} belongs to another user")
    fcntl.flock(fd, fcntl.LOCK_EX)
    return dir_fd, fd


def _start_time(pid):
    """When process ``pid`` started (clock ticks since boot, /proc's field
    22, as bytes), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[19]
    except (OSError, IndexError):
        return None


def join_or_create(count, tag, create, libc, log):
    """--join: the first peer creates the container, the others join it.

    Peers serialize on an flock(2)ed file in the caller's private
    rendezvous directory (:func:`join_dir`); the winner holds the lock while
    it sets up, so the others wait for a ready container without polling.
    The file records the winner's PID (0: its set-up failed), when that
    process started, and the peers still to come. Every peer counts itself
    out, on error too, and the last removes the file: a failed group leaves
    nothing behind. A group killed before all its peers came leaves its
    record; a record whose winner is gone (or its PID reused) is stale,
    and the next group of that tag starts afresh.
    """
    name = f"chspawner-join.{tag}"
    dir_fd, fd = locked_record(name, "--join: ")
    try:
        record = os.pread(fd, 64, 0).split()
        winner, started, left = (int(record[0]), record[1], int(record[2])) \
            if len(record) == 3 else (None, b"", count)
        if winner and _start_time(winner) != started:
            log(1, f"join: process {winner} of an earlier group is gone; starting afresh")
            winner, left = None, count
        left -= 1
        try:
            if winner is None:
                log(1, f"join: first of {count} peers, creating the container")
                winner = 0  # until it is made
                create()
                winner = os.getpid()
            elif winner == 0:
                raise Fail("--join: the first peer failed to set up the "
                           "container (see its error)")
            else:
                log(1, f"join: joining the container of process {winner}")
                join_namespaces(libc, winner)
        finally:
            if left <= 0:
                os.unlink(name, dir_fd=dir_fd)
            else:
                os.ftruncate(fd, 0)
                started = _start_time(winner) if winner else b"0"
                os.pwrite(fd, b"%d %s %d\n" % (winner, started or b"0", left), 0)
    finally:
        os.close(fd)  # also releases the lock
        os.close(dir_fd)


# ------------------------------------------------------------------ main ---

def _print_version():
    here = os.path.dirname(os.path.abspath(__file__))
    version = "unknown"
    try:
        with open(os.path.join(here, os.pardir, "_version.py")) as f:
            for line in f:
                if line.startswith("__version__"):
                    version = line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    print(version)


FEATURES = {
    "extglob": "--unset-env globs use fnmatch(3) with FNM_EXTMATCH",
    "overlayfs": "--write-fake overlays a tmpfs (Linux >= 5.11)",
    "squash": "SquashFS images, mounted with squashfuse_ll",
}


def has_feature(name):
    """--feature=NAME: exit 0 if supported, as ch-run does."""
    if name not in FEATURES:
        raise Fail(f"unknown feature: {name} (known: {', '.join(FEATURES)})")
    if name == "overlayfs":
        release = os.uname().release.split(".")
        return 0 if (int(release[0]), int(release[1])) >= (5, 11) else 1
    if name == "squash":
        return 0 if find_program("squashfuse_ll") and os.access("/dev/fuse", os.R_OK | os.W_OK) \
            else 1
    return 0


def default_signals():
    """Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec:
    give the command the default dispositions it would get from a shell."""
    import _signal
    for signum in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(signum, _signal.SIG_DFL)


def image_defaults(o, image_dir):
    """No command given: run the image's Entrypoint + Cmd, in its WorkingDir
    unless -c says otherwise, with its environment first (as Docker does).
    Returns the options this adds, for the ch-run backend's command line."""
    import json
    root = Root(image_dir)
    try:
        fd = root.open("ch/metadata.json")
        try:
            with open(fd_path(fd), "rb") as f:
                metadata = json.load(f)
        finally:
            os.close(fd)
        has_env = root.exists("ch/environment")
    except (OSError, ValueError, Fail):
        metadata, has_env = {}, False
    finally:
        os.close(root.fd)
    o.command = [str(a) for a in (metadata.get("entrypoint") or [])
                 + (metadata.get("cmd") or [])]
    if not o.command:
        raise Fail(f"no command given, and image {o.image} has no default "
                   "command (Entrypoint or Cmd)", EXIT_USAGE)
    added = []
    if has_env:
        o.env_ops.insert(0, ("image", None))
        added.append("--set-env")
    if o.cd is None and metadata.get("cwd"):
        o.cd = metadata["cwd"]
        added.append(f"--cd={o.cd}")
    return added


def exec_ch_run(o, argv):
    """The ch-run backend: hand the same command line to Charliecloud."""
    args = [a for k, a in enumerate(argv) if k not in o.backend_argv]
    if o.error is not None:
        pass  # a bad option value: ch-run reports it, in its words
    elif store_candidate(o.image, o.storage or os.environ.get("CH_IMAGE_STORAGE")
                         or default_storage()) is not None:
        find_image(o.image, o.storage)  # refuses an untrusted store (ch-run won't)
    if o.error is None and not o.command:  # what image_defaults() added, then the command
        image = find_image(o.image, o.storage)
        if os.path.isfile(image):
            raise Fail(f"no command given: backend ch-run can't read the default command "
                       f"of SquashFS image {image}", EXIT_USAGE)
        added = image_defaults(o, image)
        if args and args[-1] == "--":
            args.pop()
        args += [*added, "--", *o.command]
    ch_run = os.environ.get("CHSPAWNER_CH_RUN", "ch-run")
    default_signals()
    try:
        os.execvp(ch_run, [ch_run, *args])
    except OSError as e:
        raise Fail(f"backend ch-run: can't execute {ch_run}: {e.strerror}")


def launch(o, argv):
    """Set up the container described by ``o`` and exec its command."""
    def log(level, message):
        if o.verbose >= level:
            sys.stderr.write(f"{PROG}: {message}\n")

    if os.getuid() != os.geteuid() or os.getgid() != os.getegid():
        raise Fail("refusing to run setuid or setgid: this runtime needs no "
                   "privilege")
    if "USER" not in os.environ:  # as ch-run: /home/$USER, the store's name
        raise Fail("$USER not set")
    image_dir = find_image(o.image, o.storage)
    if o.join:  # checked before any rendezvous file is made
        count, tag = join_peer_count(o), join_tag(o)
    squash = os.path.isfile(image_dir)
    if not o.command and not squash:
        image_defaults(o, image_dir)
    elif not o.command:
        import json  # noqa: F401 (for image_defaults, once the host's library is out of reach)
    read_host_env_files(o)
    devices = resolve_devices(o, log)
    libc = _Libc()
    container = Container(o, image_dir, libc, log, devices)
    log(1, f"image {image_dir}, uid {container.cuid}, gid {container.cgid}")
    if o.join_pid is not None:
        join_namespaces(libc, o.join_pid)
    elif o.join:
        join_or_create(count, tag, container.enter, libc, log)
    else:
        container.enter()
    if not o.command:  # a SquashFS image's defaults, read inside it
        image_defaults(o, "/")
    # The environment is made inside the container, where the image's
    # /ch/environment is (and the join winner's, for peers).
    env = build_env(o, libc, os.environ, container.username)
    if o.cd is not None:
        try:
            os.chdir(o.cd)
        except OSError as e:
            raise Fail(f"can't cd to {o.cd}: {e.strerror}")
    libc.no_new_privs()
    default_signals()
    log(1, f"exec {' '.join(o.command)}")
    sys.stderr.flush()
    if o.quiet >= 2:
        silence = os.open("/dev/null", os.O_WRONLY)
        os.dup2(silence, 1)
        if o.quiet >= 3:
            os.dup2(silence, 2)
        os.close(silence)
    execvpe(o.command, env)


def execvpe(command, env):
    """Exec ``command``, searching the container's $PATH like execvp(3).

    os.execvpe would import modules lazily, and after pivot_root the host's
    Python library is out of reach.
    """
    name = command[0]
    dirs = [""] if "/" in name else env.get("PATH", "/bin:/usr/bin").split(":")
    error = None
    for d in dirs:
        path = os.path.join(d or ".", name) if d or "/" not in name else name
        try:
            os.execve(path, command, env)
        except OSError as e:
            # Like execvp(3): keep looking past a missing file, but report
            # a found-but-unusable one (EACCES) over ENOENT.
            if error is None or e.errno != 2:
                error = e
    raise Fail(f"can't execve(2): {name}: {error.strerror}", EXIT_EXEC)


def main(argv=None):
    """``chspawner run``: parse ch-run's command line and launch."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        o = parse_args(argv)
        if o.action in ("help", "usage"):
            sys.stdout.write(USAGE if o.action == "help" else
                             USAGE.split("\n", 1)[0] + "\n")
            return 0
        if o.action == "version":
            _print_version()
            return 0
        if o.action == "feature":
            return has_feature(o.feature)
        backend = o.backend or os.environ.get("CHSPAWNER_BACKEND") or "builtin"
        if o.error is not None and backend != "ch-run":
            raise o.error
        if backend == "ch-run":
            exec_ch_run(o, argv)
        elif backend != "builtin":
            raise Fail(f"CHSPAWNER_BACKEND: unknown backend {backend!r}",
                       EXIT_USAGE)
        launch(o, argv)
    except Fail as e:
        hint = f" (see '{PROG} --help')" if e.code == EXIT_USAGE else ""
        sys.stderr.write(f"{PROG}: error: {e}{hint}\n")
        return e.code
    except OSError as e:  # an unexpected system error: still one line
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return EXIT_RUNTIME
    return EXIT_RUNTIME  # not reached: launch() execs or raises


if __name__ == "__main__":
    sys.exit(main())
