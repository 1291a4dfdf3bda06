"""CDI, the Container Device Interface: spec files read, devices chosen,
and what the container needs for them, as one :class:`Edits`.

A CDI spec (JSON or YAML; NVIDIA's ``nvidia-ctk cdi generate`` writes one)
describes the devices of one kind, ``vendor.com/class``: each device, and
the spec as a whole, carries *container edits*: device nodes, bind mounts,
environment variables and hooks. ``chspawner run --device`` names devices
as CDI does (``nvidia.com/gpu=0``), a whole kind (``nvidia.com/gpu``), or a
spec file; ``--devices`` takes every device found. The launcher applies the
edits unprivileged (:mod:`launcher`); this module only reads and decides.

Differences from other CDI runtimes, all because nothing here is privileged:
hooks are never run. The ones that matter are done in the container
(``update-ldcache``: the image's own ``ldconfig``; ``create-symlinks``),
others are named in a warning. Only bind mounts exist, and they are
read-only unless the spec says ``rw``. Inside a Slurm job, a GPU kind gives
only the job's own GPUs (``SLURM_STEP_GPUS``, else ``SLURM_JOB_GPUS``).

Stdlib only, like the launcher that imports it (and only when a device is
asked for); PyYAML is imported just to read a YAML spec.
"""

import os

SYSTEM_DIRS = ("/etc/cdi", "/var/run/cdi")
SUFFIXES = (".json", ".yaml", ".yml")

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-:")
# The hooks that are done here rather than run, and those that are not
# needed without privilege (the host's /dev is the container's; the user
# already has access to what the user may use).
_DONE_HOOKS = ("update-ldcache", "create-symlinks")
_NEEDLESS_HOOKS = ("chmod", "enable-cuda-compat", "disable-device-node-modification",
                   "create-soname-symlinks")


class CdiError(Exception):
    """A request that can't be met, or a spec that can't be used: one line."""


def default_dirs(env):
    """Where specs are looked for, in increasing priority: ``$CH_RUN_CDI_DIRS``
    (ch-run's variable) if set, else the user's own ``~/.config/cdi`` and
    then the system's, so that a center's spec wins over a user's copy."""
    given = env.get("CH_RUN_CDI_DIRS")
    if given is not None:
        return [d for d in given.split(":") if d]
    config = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or "/", ".config")
    return [os.path.join(config, "cdi"), *SYSTEM_DIRS]


def job_gpus(env):
    """The GPU indices Slurm gave this job step (or job), or None outside
    a Slurm job. A job without GPUs has none: an empty set."""
    if not env.get("SLURM_JOB_ID"):
        return None
    ids = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
    return {i.strip() for i in ids.split(",") if i.strip()}


# ----------------------------------------------------------------- specs ---

class Spec:
    """One spec file: its kind, its devices' edits, and its own edits."""

    __slots__ = ("path", "kind", "devices", "edits")

    def __init__(self, path, kind, devices, edits):
        self.path = path
        self.kind = kind          # "vendor.com/class"
        self.devices = devices    # {name: containerEdits dict}
        self.edits = edits        # the spec's containerEdits (or {})


def _check_kind(kind, where):
    vendor, slash, cls = kind.partition("/") if isinstance(kind, str) else ("", "", "")
    if not (slash and vendor and cls and "/" not in cls
            and set(vendor) <= _NAME_CHARS and set(cls) <= _NAME_CHARS
            and vendor[0].isalnum() and cls[0].isalnum()):
        raise CdiError(f"{where}: kind must be vendor.com/class, not {kind!r}")
    return kind


def _parse(path, text):
    if path.endswith(".json"):
        import json
        try:
            return json.loads(text)
        except ValueError as e:
            raise CdiError(f"CDI spec {path}: not JSON: {e}")
    try:
        import yaml
    except ImportError:  # run as ``python -I -S``: add the site packages
        import site
        site.main()
        try:
            import yaml
        except ImportError:
            raise CdiError(f"CDI spec {path}: can't read YAML: PyYAML is not installed")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CdiError(f"CDI spec {path}: not YAML: {str(e).splitlines()[0]}")


def load_spec(path):
    """Read and check the spec file ``path``."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise CdiError(f"can't read CDI spec {path}: {e.strerror}")
    except UnicodeDecodeError:
        raise CdiError(f"CDI spec {path}: not UTF-8 text")
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise CdiError(f"CDI spec {path}: not a mapping")
    if not isinstance(data.get("cdiVersion"), str):
        raise CdiError(f"CDI spec {path}: no cdiVersion")
    kind = _check_kind(data.get("kind"), f"CDI spec {path}")
    devices = {}
    entries = data.get("devices")
    if not isinstance(entries, list) or not entries:
        raise CdiError(f"CDI spec {path}: no devices")
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS \
                or not name[0].isalnum():
            raise CdiError(f"CDI spec {path}: bad device name {name!r}")
        if name in devices:
            raise CdiError(f"CDI spec {path}: device {name} defined twice")
        edits = entry.get("containerEdits")
        if not isinstance(edits, dict):
            raise CdiError(f"CDI spec {path}: device {name} has no containerEdits")
        devices[name] = edits
    edits = data.get("containerEdits") or {}
    if not isinstance(edits, dict):
        raise CdiError(f"CDI spec {path}: containerEdits is not a mapping")
    return Spec(path, kind, devices, edits)


def spec_files(dirs):
    """The spec files in ``dirs``, in priority order (a directory, then
    names in order), skipping directories that don't exist."""
    files = []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise CdiError(f"can't list CDI spec directory {d}: {e.strerror}")
        files += [os.path.join(d, n) for n in names if n.endswith(SUFFIXES)]
    return files


# ----------------------------------------------------------------- edits ---

class Edits:
    """What the container needs for the chosen devices, merged."""

    def __init__(self):
        self.nodes = []     # [(host path, container path)]
        self.mounts = []    # [(host path, container path, read-only)]
        self.env = []       # [(name, value)], in order
        self.ldcache = []   # container folders for the image's ldconfig
        self.links = []     # [(target, link)] to make in the container
        self.warnings = []  # one line each, for stderr
        self.notes = []     # for -v
        self._at = {}       # container path -> host path, for conflicts

    def _place(self, host, container, what):
        """``container`` normalized, to be given ``host``; None if it gets
        ``host`` already; CdiError if it gets something else."""
        if not container.startswith("/"):
            raise CdiError(f"{what}: container path must be absolute: {container!r}")
        container = os.path.normpath(container)
        known = self._at.get(container)
        if known == host:
            return None
        if known is not None:
            raise CdiError(f"{what}: {container} would be both {known} and {host}")
        self._at[container] = host
        return container

    def add(self, edits, what):
        """Add one containerEdits mapping (of device or spec ``what``)."""
        for key in edits:
            if key not in ("env", "deviceNodes", "mounts", "hooks"):
                self.warnings.append(f"{what}: ignored containerEdits.{key} "
                                     "(not possible without privilege)")
        for item in edits.get("env") or ():
            name, eq, value = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not name or not eq:
                raise CdiError(f"{what}: bad env entry {item!r} (NAME=VALUE)")
            self.env.append((name, value))
        for node in edits.get("deviceNodes") or ():
            self._add_node(node, what)
        for mount in edits.get("mounts") or ():
            self._add_mount(mount, what)
        for hook in edits.get("hooks") or ():
            self._add_hook(hook, what)

    def add_library_links(self):
        """The links ldconfig would make for the libraries mounted in an
        update-ldcache folder (SONAME -> file), to be made beside them: the
        image's ldconfig can't write its read-only directories, and the
        cache names a library by its SONAME link."""
        folders = {os.path.normpath(f) for f in self.ldcache}
        for host, path, _ in list(self.mounts):
            folder, name = os.path.split(path)
            if folder not in folders or not os.path.isfile(host):
                continue
            soname = elf_soname(host)
            link = f"{folder}/{soname}"
            if soname and soname != name and link not in self._at:
                self._at[link] = name
                self.links.append((name, link))

    def _add_node(self, node, what):
        path = node.get("path") if isinstance(node, dict) else None
        if not isinstance(path, str) or not path.startswith("/"):
            raise CdiError(f"{what}: device node without an absolute path: {node!r}")
        host = node.get("hostPath") or path
        try:
            mode = os.stat(host).st_mode & 0o170000
        except OSError as e:
            raise CdiError(f"{what}: device node {host}: {e.strerror}")
        if mode not in (0o020000, 0o060000):  # character, block
            raise CdiError(f"{what}: {host} is not a device node")
        container = self._place(host, path, what)
        if container is None:
            return
        if container == host and host.startswith("/dev/"):
            self.notes.append(f"{what}: device node {host} (the host's /dev)")
        else:
            self.nodes.append((host, container))

    def _add_mount(self, mount, what):
        if not isinstance(mount, dict):
            raise CdiError(f"{what}: bad mount {mount!r}")
        host, path = mount.get("hostPath"), mount.get("containerPath")
        options = mount.get("options") or []
        kind = mount.get("type") or "bind"
        if kind not in ("bind", "none") and "bind" not in options and "rbind" not in options:
            raise CdiError(f"{what}: {kind} mount at {path} not supported "
                           "(only bind mounts, without privilege)")
        if not isinstance(host, str) or not host.startswith("/"):
            raise CdiError(f"{what}: mount without an absolute hostPath: {mount!r}")
        if not isinstance(path, str):
            raise CdiError(f"{what}: mount without containerPath: {mount!r}")
        if not os.path.exists(host):
            raise CdiError(f"{what}: host path {host} not found")
        container = self._place(host, path, what)
        if container is not None:
            self.mounts.append((host, container, "rw" not in options))

    def _add_hook(self, hook, what):
        args = hook.get("args") if isinstance(hook, dict) else None
        path = hook.get("path") if isinstance(hook, dict) else None
        if not isinstance(path, str) or not isinstance(args or [], list):
            raise CdiError(f"{what}: bad hook {hook!r}")
        words = [str(a) for a in (args or [path])][1:]
        if words[:1] == ["hook"]:  # "nvidia-ctk hook NAME" = "nvidia-ctk-hook NAME"
            words = words[1:]
        name = words[0] if words else os.path.basename(path)
        options = words[1:]
        if name == "update-ldcache":
            self.ldcache += _values(options, "--folder")
        elif name == "create-symlinks":
            for link in _values(options, "--link"):
                target, sep, at = link.partition("::")
                if sep and at.startswith("/"):
                    self.links.append((target, at))
        elif name in _NEEDLESS_HOOKS:
            self.notes.append(f"{what}: hook {name} not needed without privilege")
        else:
            self.warnings.append(f"{what}: hook {path} {' '.join(words)} not run "
                                 "(unknown to chspawner)")


def elf_soname(path):
    """The DT_SONAME of ELF shared object ``path``, or None (not ELF, or
    none): what ldconfig names a library's link, read from the dynamic
    section through the program headers."""
    import struct
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] not in (1, 2):
                return None
            wide, end = head[4] == 2, "<" if head[5] == 1 else ">"
            if wide:
                (phoff,), (phentsize, phnum) = (struct.unpack_from(end + "Q", head, 32),
                                                struct.unpack_from(end + "HH", head, 54))
            else:
                (phoff,), (phentsize, phnum) = (struct.unpack_from(end + "I", head, 28),
                                                struct.unpack_from(end + "HH", head, 42))
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            loads, dynamic = [], None
            for i in range(phnum):
                if wide:
                    kind, _, offset, vaddr, _, filesz = struct.unpack_from(
                        end + "IIQQQQ", table, i * phentsize)
                else:
                    kind, offset, vaddr, _, filesz = struct.unpack_from(
                        end + "IIIII", table, i * phentsize)
                if kind == 1:    # PT_LOAD
                    loads.append((vaddr, offset, filesz))
                elif kind == 2:  # PT_DYNAMIC
                    dynamic = (offset, filesz)
            if dynamic is None:
                return None
            f.seek(dynamic[0])
            data = f.read(dynamic[1])
            entry = struct.Struct(end + ("qQ" if wide else "iI"))
            strtab = soname = None
            for at in range(0, len(data) - entry.size + 1, entry.size):
                tag, value = entry.unpack_from(data, at)
                if tag == 0:     # DT_NULL
                    break
                if tag == 5:     # DT_STRTAB (an address)
                    strtab = value
                elif tag == 14:  # DT_SONAME (an offset in it)
                    soname = value
            if strtab is None or soname is None:
                return None
            for vaddr, offset, filesz in loads:
                if vaddr <= strtab < vaddr + filesz:
                    f.seek(offset + strtab - vaddr + soname)
                    name = f.read(256).split(b"\0", 1)[0]
                    return os.fsdecode(name) if name and b"/" not in name else None
    except (OSError, struct.error):
        return None
    return None


def _values(options, flag):
    """The values of ``flag`` in ``options`` (``--flag V`` or ``--flag=V``)."""
    values, i = [], 0
    while i < len(options):
        word = options[i]
        if word == flag and i + 1 < len(options):
            values.append(options[i + 1])
            i += 1
        elif word.startswith(flag + "="):
            values.append(word[len(flag) + 1:])
        i += 1
    return values


# --------------------------------------------------------------- requests ---

class Registry:
    """The specs found in ``dirs``, and the devices chosen from them.

    A device named in several spec files comes from the one of highest
    priority (a later directory; CDI's rule); a spec file that can't be
    read is skipped with a warning unless a request names it.
    """

    def __init__(self, dirs, env):
        self.dirs = dirs
        self.gpus = job_gpus(env)
        self.edits = Edits()
        self.kinds = {}          # kind -> {device name: Spec}
        self._specs_done = set()  # specs whose own edits were added
        for path in spec_files(dirs):
            try:
                spec = load_spec(path)
            except CdiError as e:
                self.edits.warnings.append(f"{e} (skipped)")
                continue
            devices = self.kinds.setdefault(spec.kind, {})
            for name in spec.devices:
                devices[name] = spec   # later directories win

    def request(self, device):
        """Choose ``device`` (a CDI name, a kind, or a spec file path) and
        return the environment it sets, in order. Its other edits are
        merged into ``self.edits``."""
        start = len(self.edits.env)
        if device.startswith(("/", ".")):
            spec = load_spec(device)
            for n in self._allowed(spec.kind, list(spec.devices), device, whole=True):
                self._add(spec, n)
        else:
            kind, eq, name = device.partition("=")
            _check_kind(kind, f"--device={device}")
            known = self.kinds.get(kind)
            if not known:
                where = ":".join(self.dirs) or "(no directories)"
                raise CdiError(f"--device={device}: no CDI spec for {kind} in {where}")
            if eq and name not in known:
                raise CdiError(f"--device={device}: unknown device; {kind} has: "
                               f"{', '.join(sorted(known))}")
            whole = not eq or name == "all"
            for n in self._allowed(kind, list(known) if whole else [name], device, whole):
                self._add(known[n], n)
        return self.edits.env[start:]

    def request_all(self):
        """``--devices``: every device found (a job's own GPUs only)."""
        start = len(self.edits.env)
        for kind, known in sorted(self.kinds.items()):
            if self._is_gpu(kind) and self.gpus is not None and not self.gpus:
                self.edits.notes.append(f"{kind}: this Slurm job has no GPUs")
                continue
            for n in self._allowed(kind, list(known), kind, whole=True):
                self._add(known[n], n)
        return self.edits.env[start:]

    @staticmethod
    def _is_gpu(kind):
        return kind.rpartition("/")[2] == "gpu"

    def _allowed(self, kind, names, asked, whole):
        """The device ``names`` of ``kind`` this process may use. In a Slurm
        job a GPU kind is limited to the job's GPUs: a whole kind (or "all")
        gives the devices named by the job's GPU indices; a GPU of another
        job is refused."""
        if self.gpus is None or not self._is_gpu(kind):
            return names
        mine = ", ".join(sorted(self.gpus)) or "none"
        if not self.gpus:
            raise CdiError(f"--device={asked}: this Slurm job has no GPUs "
                           "(ask Slurm for some: --gpus=N or --gres=gpu:N)")
        chosen = [n for n in names if n in self.gpus]
        if whole and not chosen:
            raise CdiError(f"--device={asked}: no CDI device of {kind} is named by one "
                           f"of this Slurm job's GPUs ({mine})")
        if not whole and not chosen:
            raise CdiError(f"--device={asked}: not this Slurm job's GPU (the job has: {mine})")
        return chosen

    def _add(self, spec, name):
        """One device's edits, and its spec's own the first time."""
        self.edits.add(spec.devices[name], f"CDI device {spec.kind}={name}")
        if spec.path not in self._specs_done:
            self._specs_done.add(spec.path)
            self.edits.add(spec.edits, f"CDI spec {spec.path}")
