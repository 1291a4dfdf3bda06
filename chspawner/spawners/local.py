"""``ChSpawner``: a user's server, or its kernels, in an image, on the hub's
host (``SlurmChSpawner``, in chspawner.spawners.slurm, runs it as a Slurm
job).

``ChSpawner`` is JupyterHub's LocalProcessSpawner (the hub, as root, starts
the server as the user's own account) with a choice of image and mode:

* ``kernels``: the single-user server runs natively and offers the image's
  kernels in its kernel picker (they run in the image through the
  chspawner kernel provisioner, with the user's home and the admin's
  ``binds``, in the notebook's directory); the image's kernel is the
  default, and the host's kernels are offered only with
  ``offer_host_kernels`` (see kernels_mode_args);
* ``server``: the single-user server itself runs inside the image, started
  through the one RunSpec (the image must provide jupyterhub-singleuser).

The admin lists the images users may pick (``images``, in the site store
``site_storage``; an entry may name the JupyterHub groups it is offered to
and the modes it may run in) and may allow users' own stored images. User
options come from the form or the REST API; JupyterHub's
``apply_user_options`` hook is the admin's (by default it does nothing),
and whatever it did, ``check_options`` validates what will run before
anything changes (right after the hook, and again as the spawn's first
step, after the admin's ``pre_spawn_hook``): a bad option is a 400
(``OptionError``) whose one-line message JupyterHub shows to the user.

``start()`` is a recipe of named steps, each a method that
SlurmChSpawner overrides where a job differs from a local process:
``reattach`` (a server still starting from before a hub restart),
``ask_once`` (what a user may choose, where Slurm must be asked: once a
spawn), ``check_options`` (the user's options, as the admin's hook left them),
``ensure_image`` (pull the admin's image on its first use), ``pick_port``,
``launch`` (run ``get_command()``: the native server, or the container
running it) and ``wait_ready`` (until the user's own process answers).
"""
from __future__ import annotations

import asyncio
import json
from inspect import isawaitable
import os
import pwd
import shlex
import socket
import sys
from subprocess import Popen

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.spawner import LocalProcessSpawner
from jupyterhub.utils import random_port
from traitlets import Bool, Dict, Integer, List, Unicode, default, validate

from chspawner.images import ImageError
from chspawner.images.store import Store, StoreError, check_name
from chspawner.runtime.spec import RunSpec, to_argv
from chspawner.spawners.listening import MINE, TAKEN, listener_uids, port_owner
from chspawner.spawners.options import (MODES, OptionError, SpawnerError, check_binds,
                                        check_devices,
                                        check_images, check_plain, json_type,
                                        own_image_description, render_form, shown)
SINGLEUSER_PATHS = ("usr/local/bin/jupyterhub-singleuser", "usr/bin/jupyterhub-singleuser",
                    "opt/conda/bin/jupyterhub-singleuser")


class ChSpawner(LocalProcessSpawner):
    """A user's server, or its kernels, in a container image of their choice."""

    images = List(
        Dict(), help="""Images users may pick, in the site store:
        [{"name": "pytorch:24", "description": "PyTorch 2.4, CUDA 12",
          "pull": "registry.example.org/ml/pytorch:24"}, ...].
        An image with "pull" that is not in the site store yet is pulled on
        its first spawn, on the hub's host, as the site store's owner (never
        as root), with its progress on the spawn page; later spawns, by any
        user, use it from the store. "insecure": true allows a registry
        without TLS. "groups": ["physics", ...] offers the image only to
        members of those JupyterHub groups (default: to everyone).
        "modes": ["kernels"] lets it run only in those of ``modes`` (the
        form says so). "move_at_walltime": true (SlurmChSpawner) moves its
        sessions to a successor job before their time limit, whatever
        ``walltime_move`` says. Checked when the hub starts: an unknown key or a bad
        name stops it with a message that says which entry.""",
    ).tag(config=True)
    chspawner_cmd = List(
        Unicode(), [sys.executable, "-m", "chspawner.cli"],
        help="The chspawner command that pulls images, run as the site store's "
             "owner: that account must be able to run it.",
    ).tag(config=True)
    pull_args = List(
        Unicode(),
        help="Extra options of every pull of a site image, e.g. ['--max-size=20G', "
             "'--stall-seconds=120'] (see chspawner pull --help): the limits on what a "
             "registry can make the hub's host download and unpack.",
    ).tag(config=True)
    site_storage = Unicode(
        None, allow_none=True,
        help="The store holding the admin's images (readable by all users).",
    ).tag(config=True)
    allow_user_images = Bool(
        False, help="Also offer the images in each user's own store.",
    ).tag(config=True)
    modes = List(Unicode(), list(MODES),
                 help="Modes offered: 'kernels', 'server' (the first is the default).",
                 ).tag(config=True)
    backend = Unicode("builtin", help="Container runtime: builtin or ch-run.").tag(
        config=True)
    binds = List(
        Unicode(),
        help="Host paths bound into every container (SRC[:DST]): the server's in "
             "server mode, each kernel's in kernels mode (with the user's home, at "
             "/home/$USER, in both).",
    ).tag(config=True)
    devices = List(
        Unicode(),
        help="CDI devices every container gets (chspawner run --device), the "
             "server's in server mode, each kernel's in kernels mode: "
             "vendor.com/class=NAME or a whole kind (nvidia.com/gpu). Their CDI "
             "specs must be on the node the container runs on (/etc/cdi, /var/run/cdi).",
    ).tag(config=True)
    offer_host_kernels = Bool(
        False,
        help="Kernels mode: also offer the kernels installed on the server's host "
             "(its python3...) beside the chosen image's. Off by default: the "
             "image's kernel is the only one, and the default, so nobody runs on "
             "the host by mistake.",
    ).tag(config=True)
    image_cmd = List(
        Unicode(), ["jupyterhub-singleuser"],
        help="The single-user server's command inside an image (server mode), "
             "found on the image's PATH.",
    ).tag(config=True)
    kernel_session_state = Bool(
        False, help="Kernels mode: each ipykernel kernel of an image records its "
                    "session as cells run (chspawner's session recorder, brought by "
                    "the provisioner: the image needs only ipykernel), so that the "
                    "session can be saved and restored into a new kernel: on request "
                    "(JupyterLab's Save/Restore Kernel Session, the REST calls), "
                    "when a kernel job is moved before its time limit, and after a "
                    "kernel job is lost (its latest snapshot). Snapshots live in the "
                    "user's ~/.local/share/chspawner/snapshots. See the user guide's "
                    "'Kernel state across moves'.",
    ).tag(config=True)
    kernel_snapshot_limit = Integer(
        2 * 1000**3, help="With kernel_session_state: the most bytes of variables one "
                          "snapshot holds; larger values are rebuilt by re-running the "
                          "cells that made them, or reported as not restored. 0: no limit.",
    ).tag(config=True)
    kernel_autosave_interval = Integer(
        0, help="With kernel_session_state: seconds between automatic snapshots of "
                "an idle kernel that ran cells since its last one, so that a kernel "
                "lost without warning (its node, its memory) comes back as of then. "
                "0: snapshots only before moves and on request.",
    ).tag(config=True)
    persistent_kernels = Bool(
        True, help="Kernels mode: kernels outlive their server (chspawner.persist's "
                   "kernel manager): a server started again (by the session manager, "
                   "after a loss) takes them over, and replays the output its "
                   "clients missed.",
    ).tag(config=True)
    extra_options = List(
        Unicode(), help="Names of user options that the admin's own apply_user_options "
                        "hook handles: accepted (as plain text, if strings) rather than "
                        "refused as unknown. What they mean is the hook's business.",
    ).tag(config=True)
    user_storage = Unicode(
        "/var/tmp/{username}.ch",
        help="Each user's own store ({username} is filled in), for allow_user_images.",
    ).tag(config=True)

    # One pull of an image at a time in this hub: a second spawn of an image
    # being pulled waits for it rather than pulling it again.
    _pulls: dict[str, asyncio.Lock] = {}

    image = Unicode("", help="The image of the running or starting server (state).")
    mode = Unicode("", help="kernels or server (state).")

    @validate("images")
    def _check_images(self, proposal) -> list[dict]:
        return check_images(proposal["value"], f"{type(self).__name__}.images")

    @validate("binds")
    def _check_binds(self, proposal) -> list[str]:
        return check_binds(proposal["value"], f"{type(self).__name__}.binds")

    @validate("devices")
    def _check_devices(self, proposal) -> list[str]:
        return check_devices(proposal["value"], f"{type(self).__name__}.devices")

    @default("apply_user_options")
    def _default_apply_user_options(self):
        # The admin's hook. The default does nothing (and keeps JupyterHub
        # from warning about unhandled options): the options are applied
        # and validated by start()'s check_options, after any hook, so no
        # hook can turn the validation off.
        return lambda spawner, options: None

    # ---------------------------------------------------- user options ---

    def user_groups(self) -> set[str]:
        """The names of the user's JupyterHub groups."""
        return {getattr(g, "name", g) for g in getattr(self.user, "groups", None) or []}

    def offered_images(self) -> dict[str, str]:
        """{name: description} a user may choose from: the admin's images
        (those with "groups" only to their members), then the user's own."""
        groups = self.user_groups()
        offered = {i["name"]: i.get("description", "") for i in self.images
                   if "groups" not in i or groups & set(i["groups"])}
        if self.allow_user_images:
            try:
                images = self.user_store().images()
            except StoreError as e:
                # Planted by another user, or open to them: not offered.
                self.log.warning("not offering %s's own images: %s", self.user.name, e)
                images = []
            for info in images:
                offered.setdefault(info.name,
                                   own_image_description(info.description, info.source))
        return offered

    def user_store(self) -> Store:
        """The user's own store, trusted only as theirs: made by them (or
        root), writable by nobody else (see chspawner.images.store)."""
        return Store(self.user_storage.format(username=self.user.name),
                     owner=pwd.getpwnam(self.user.name).pw_uid)

    def store_for(self, image: str) -> Store:
        if self.site_entry(image) is not None:
            return Store(self.site_storage)
        return self.user_store()

    def site_entry(self, image: str) -> dict | None:
        return next((i for i in self.images if i.get("name") == image), None)

    def image_modes(self, image: str) -> list[str]:
        """The modes ``image`` may run in: the admin's ``modes``, less those
        its entry leaves out."""
        allowed = (self.site_entry(image) or {}).get("modes")
        return [m for m in self.modes if allowed is None or m in allowed]

    #: The options a user may give, and their JSON types.
    OPTION_TYPES: dict[str, type] = {"image": str, "mode": str}

    def run_pre_spawn_hook(self):
        """JupyterHub's step after the admin's apply_user_options: the
        options are checked here already, so that a mistake is the spawn
        request's own answer (400), then again as start()'s first step,
        after the admin's pre_spawn_hook too. Synchronous unless Slurm must
        be asked (JupyterHub waits for a coroutine in a task: the request
        would be answered 202 before the check ends)."""
        if self.options_need_asking():
            return self._asked_pre_spawn_hook()
        self.check_options()
        return super().run_pre_spawn_hook()

    async def _asked_pre_spawn_hook(self) -> None:
        await self.ask_for_options()
        self.check_options()
        self._asked_for_spawn = True  # (start() uses this answer: see ask_once)
        result = super().run_pre_spawn_hook()
        if isawaitable(result):
            await result

    def options_need_asking(self) -> bool:
        """Whether what a user may choose must be asked for (ask_for_options)."""
        return False

    async def ask_for_options(self) -> None:
        """Learn what a user may choose, where it takes asking (Slurm)."""

    _asked_for_spawn = False  # (whether this spawn's pre-spawn step asked already)

    async def ask_once(self) -> None:
        """start()'s ask_for_options: once a spawn. The pre-spawn step, which
        JupyterHub runs right before start(), asked already when its options
        passed: its answer stands (one sacctmgr a spawn, not two); a start()
        without that step (or after it failed) asks."""
        asked, self._asked_for_spawn = self._asked_for_spawn, False
        if not asked:
            await self.ask_for_options()

    def check_options(self) -> None:
        """The spawn's first step: validate what will run, whatever the
        admin's ``apply_user_options`` did. Its input: the user's options as
        the hook left them (it gets the dict itself), with the image and
        mode the hook set on the spawner, if any, in place of the user's;
        nothing changes unless all of it is good (OptionError)."""
        options = self.user_options
        if isinstance(options, dict):
            options = dict(options)
            for key in ("image", "mode"):
                if getattr(self, key):  # (set by the hook: cleared after each run)
                    options[key] = getattr(self, key)
            self.image = self.mode = ""  # (until they are found good)
        self.validate_user_options(options)

    def validate_user_options(self, options: dict) -> None:
        """Check the options, then set ``image`` and ``mode``: nothing
        changes unless all of them are good. Types are checked before
        values: ``{"image": 0}`` is refused, not read as "the default"."""
        self.check_option_types(options)
        offered = self.offered_images()
        # An option left out (or left empty, as the form leaves a choice
        # it doesn't offer) takes its default.
        image = options.get("image") or next(iter(offered), "")
        modes = self.image_modes(image)
        mode = options.get("mode") or (modes[0] if modes else "")
        try:
            check_name(image)
        except ImageError as e:
            raise OptionError(str(e)) from None
        if image not in offered:
            raise OptionError(f"image {image!r} is not offered here")
        if mode not in modes:
            raise OptionError(f"mode {mode!r} is not offered for image {image} "
                              f"(offered: {', '.join(modes) or 'none'})")
        store = self.store_for(image)
        try:
            if not store.exists(image) and (self.site_entry(image) or {}).get("pull"):
                problem = None  # pulled when the spawn starts
            else:
                problem = self.server_mode_problem(image, mode, store.require(image))
        except ImageError as e:  # missing, or a store that must be refused
            raise OptionError(str(e)) from None
        if problem:
            raise OptionError(problem)
        self.image, self.mode = image, mode

    def check_option_types(self, options: object) -> None:
        """A 400 unless ``options`` is an object of known options, each of
        its type. Unknown options are refused, not ignored: a misspelt one
        would otherwise spawn the defaults without a word."""
        self._refuse_non_object_body()
        if not isinstance(options, dict):
            raise OptionError(f"the options must be a JSON object, not "
                              f"{json_type(options)}")
        unknown = set(options) - set(self.OPTION_TYPES) - set(self.extra_options)
        if unknown:
            names = sorted(map(shown, unknown))
            raise OptionError(f"unknown options: {', '.join(names[:5])}"
                              + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
        for key, kind in self.OPTION_TYPES.items():
            value = options.get(key)
            # (JSON's true is a Python int too: only a bool option takes it.)
            right = isinstance(value, bool) if kind is bool else \
                isinstance(value, kind) and not isinstance(value, bool)
            if key in options and not right:
                raise OptionError(self.type_problem(key, value))
        for key, value in options.items():
            if isinstance(value, str):
                check_plain(key, value)

    def type_problem(self, key: str, value: object) -> str:
        """The one-line message for an option of the wrong type."""
        return f"{key} must be a string, not {json_type(value)}"

    def _refuse_non_object_body(self) -> None:
        """JupyterHub's REST API takes an empty body, or a JSON ``null``,
        for "no options" (the defaults, or the last ones) and refuses a body
        that is not an object -- except ``false``, ``0``, ``""`` and ``[]``,
        which it reads as no body at all. Those are refused here too."""
        handler = getattr(self, "handler", None)  # (the request that spawns)
        if not isinstance(handler, APIHandler) or handler.request.method != "POST" \
                or not handler.request.body.strip():
            return
        try:
            body = json.loads(handler.request.body)
        except ValueError:
            return  # (JupyterHub refused it already)
        if body is not None and not isinstance(body, dict):
            raise OptionError(f"the request body must be a JSON object, not "
                              f"{json_type(body)}")

    @staticmethod
    def server_mode_problem(image: str, mode: str, path) -> str | None:
        """Why ``image`` (at ``path``) can't run in ``mode``, if it can't."""
        if mode == "server" and not any((path / p).exists() for p in SINGLEUSER_PATHS):
            return (f"image {image} has no jupyterhub-singleuser, so it can't run the "
                    "server itself; choose kernels mode")
        return None

    @default("options_form")
    def _default_options_form(self):
        return self.render_options_form

    def render_options_form(self, spawner=None) -> str:
        """The spawn form (templates/options_form.html)."""
        return render_form(self.options_form_context())

    def options_form_context(self) -> dict:
        """What the form offers (see chspawner.spawners.options.render_form)."""
        return {"images": [(name, description, self._restricted_modes(name))
                           for name, description in self.offered_images().items()],
                "modes": list(self.modes), "choices": [], "numbers": []}

    def _restricted_modes(self, image: str) -> list[str]:
        """The image's modes, if fewer than all offered ([] if all)."""
        modes = self.image_modes(image)
        return [] if modes == list(self.modes) else modes

    def options_from_form(self, formdata: dict) -> dict:
        return {key: formdata[key][0] for key in ("image", "mode") if formdata.get(key)}

    # ------------------------------------------------------------ launch --

    def get_command(self) -> list[str]:
        """The server's argv: the native server (``cmd`` and its arguments)
        in kernels mode; in server mode, the container that runs the
        image's server with those arguments."""
        if self.mode == "server":
            return self.container_argv()
        return [*self.cmd, *self.get_args()]

    def get_args(self) -> list[str]:
        """The single-user server's arguments (in both modes)."""
        # A copy: JupyterHub's get_args() returns the ``args`` trait itself,
        # which += would grow by these at every spawn of this spawner.
        args = list(super().get_args())
        # The server's own kernels on Unix sockets in its private runtime
        # directory, not on TCP ports other users could read (both modes).
        args += ["--KernelManager.transport=ipc"]
        if self.mode == "kernels":
            args += self.kernels_mode_args()
        return args

    def kernels_mode_args(self) -> list[str]:
        """The native server's arguments that offer the chosen image's
        kernels: only that image's (the host's too with
        ``offer_host_kernels``), its kernel the default (the kernel manager
        asks the kernelspec manager for it), each kernel with the admin's
        binds and the user's home, started in its notebook's directory
        (jupyter_server passes it; the provisioner maps it into the
        container)."""
        store = self.store_for(self.image)
        args = ["--ServerApp.kernel_spec_manager_class="
                "chspawner.provisioner.kernelspecs.ContainerKernelSpecManager",
                f"--ContainerKernelSpecManager.storage={store.root}",
                # One item per flag: the server doesn't know this class
                # up front, so a list literal would stay one string.
                f"--ContainerKernelSpecManager.only_images={self.image}",
                f"--ContainerKernelSpecManager.include_native={self.offer_host_kernels}",
                # The session's jobs for chspawner's JupyterLab extension (its time left).
                "--ServerApp.jpserver_extensions=chspawner.persist.session_status=True",
                # Kernels' sessions saved, restored and moved (kernel_session_state).
                "--ServerApp.jpserver_extensions=chspawner.persist.kernel_state=True",
                f"--KernelState.snapshot_limit={self.kernel_snapshot_limit}",
                f"--KernelState.autosave_interval={self.kernel_autosave_interval}"]
        config = self.kernel_provisioner_config()
        if config:
            # A Python literal: traitlets reads a Dict from the command line
            # with ast.literal_eval (JSON's true would stay a string).
            args.append(f"--ContainerKernelSpecManager.provisioner_config={config!r}")
        if self.persistent_kernels:
            args += ["--ServerApp.kernel_manager_class="
                     "chspawner.persist.kernel_manager.PersistentKernelManager",
                     "--ServerApp.kernel_websocket_connection_class="
                     "chspawner.persist.kernel_connection.ReplayingKernelConnection",
                     "--ServerApp.session_manager_class="
                     "chspawner.persist.notebook_sessions.PersistentSessionManager"]
        else:
            # Kernels that end with their server, still on private IPC and
            # still with the image's kernel as the default.
            args += ["--ServerApp.kernel_manager_class="
                     "chspawner.persist.kernel_manager.EphemeralKernelManager"]
        return args

    def kernel_provisioner_config(self) -> dict:
        """The chspawner provisioner's settings for every image kernel
        (chspawner.provisioner.settings: its ``home`` is on by default)."""
        config: dict = {"binds": list(self.binds)} if self.binds else {}
        if self.kernel_session_state:
            config["session_state"] = True
        devices = self.container_devices()
        if devices:
            config["devices"] = devices
        return config

    def container_devices(self) -> list[str]:
        """The CDI devices of this server's containers (``devices``)."""
        return list(self.devices)

    async def start(self) -> tuple[str, int]:
        """The spawn: the same steps for every spawner of chspawner; a
        subclass overrides a step, not the recipe."""
        self._events = asyncio.Queue()
        if not await self.reattach():
            await self.ask_once()
            self.check_options()
            await self.ensure_image()
            self.pick_port()
            await self.launch()
        return await self.wait_ready()

    async def reattach(self) -> bool:
        """Take over this server's launch from before a hub restart, if it
        is still under way: True if so (no new launch then). A local
        process is either running (the hub's poll finds it) or gone."""
        return False

    async def launch(self) -> None:
        """Start the server (``get_command()``) as the user, on this host."""
        self._emit(20, f"starting the {self.mode} mode with image {self.image}")
        argv = self.get_command()
        if self.shell_cmd:  # (JupyterHub's setting: the command as one argument)
            argv = [*self.shell_cmd, shlex.join(argv)]
        self.log.info("Spawning %s", shlex.join(argv))
        self.proc = Popen(argv, **{"preexec_fn": self.make_preexec_fn(self.user.name),
                                   "start_new_session": True,  # the hub's signals aren't its
                                   **self.popen_kwargs, "env": self.get_env()})
        self.pid = self.proc.pid
        host = socket.gethostname()
        self._emit(40, f"container started on {host}, image {self.image}"
                   if self.mode == "server" else
                   f"server started on {host}; kernels run in image {self.image}")

    async def wait_ready(self) -> tuple[str, int]:
        """Return (ip, port) once the server answers there (see
        _wait_listening)."""
        await self._wait_listening(self.port)
        self._emit(60, "server responding")
        return self.ip or "127.0.0.1", self.port

    def pick_port(self) -> None:
        """A new random port for each spawn, unless the admin set one: a
        port found taken (see _wait_listening) is not tried again."""
        if self.port == 0 or getattr(self, "_port_picked", False):
            self.port, self._port_picked = random_port(), True

    def user_uid(self) -> int:
        return pwd.getpwnam(self.user.name).pw_uid

    async def _wait_listening(self, port: int) -> None:
        """Return once the server listens, proven to be the user's own
        process: the hub's host lists every listening socket with its
        owner (chspawner.spawners.listening), so nothing is sent to a listener to
        find out, and another user's process listening on the port fails
        the spawn, never receiving the user's browser. Returning at once
        also spares the hub's own check its back-off. A server that exits
        first fails the spawn at once, with its exit status."""
        what = f"image {self.image}, {self.mode} mode"  # (poll() clears them)
        uid = self.user_uid()
        while True:
            owner = port_owner(port, uid)
            if owner == TAKEN:
                self.log.warning("chspawner: %s: port %d is held by uid(s) %s", self._log_name,
                                 port, sorted(listener_uids(port) - {uid}))
                raise SpawnFailed(f"port {port} on {socket.gethostname()} is taken by "
                                  "another user's process; your server was not started "
                                  "there. " + self.port_advice())
            if owner == MINE:
                return
            status = await self.poll()
            if status is not None:
                raise SpawnFailed(f"the server exited with status {status} before it "
                                  f"answered ({what})")
            await asyncio.sleep(0.05)  # a polling interval: listening signals nothing

    def port_advice(self) -> str:
        if getattr(self, "_port_picked", False):
            return "Start it again: another port is picked each time."
        return "The port is set by the admin: ask them to free it or to choose another."

    async def ensure_image(self) -> None:
        """Pull the admin's image on its first use (see ``images``)."""
        entry, store = self.site_entry(self.image), self.store_for(self.image)
        if not entry or not entry.get("pull") or store.exists(self.image):
            return
        lock = self._pulls.setdefault(f"{store.root}:{self.image}", asyncio.Lock())
        async with lock:
            if not store.exists(self.image):  # (unless a spawn waited on was pulling it)
                await self._pull(entry, store)
        problem = self.server_mode_problem(self.image, self.mode, store.require(self.image))
        if problem:
            raise SpawnFailed(problem)

    async def _pull(self, entry: dict, store: Store) -> None:
        owner = pwd.getpwuid(os.stat(store.root).st_uid)
        if owner.pw_uid == 0:
            raise SpawnFailed(f"can't pull {self.image}: the site store {store.root} "
                              "belongs to root, and images are never pulled as root; "
                              "give it to a service account")
        argv = [*self.chspawner_cmd, "pull", "--json-progress", "-s", str(store.root),
                *(["--insecure"] if entry.get("insecure") else []), *self.pull_args,
                entry["pull"], self.image]
        self._pull_percent, self._pull_seen = 2, set()
        self._emit(2, f"pulling image {self.image} from {entry['pull']}")
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": owner.pw_dir,
                 "USER": owner.pw_name, "LANG": "C.UTF-8"},
            preexec_fn=self.make_preexec_fn(owner.pw_name))
        try:
            async for line in process.stdout:
                self._pull_event(line)
            error = (await process.stderr.read()).decode(errors="replace").strip()
            if await process.wait() != 0:
                reason = error.splitlines()[-1] if error else "failed"
                raise SpawnFailed(f"can't pull image {self.image}: "
                                  + reason.removeprefix("chspawner pull: error: "))
        finally:
            if process.returncode is None:  # the spawn was cancelled: so is the pull
                process.terminate()          # (it cleans up after itself on SIGTERM)
                await process.wait()

    def _pull_event(self, line: bytes) -> None:
        """A pull's JSON progress line as a spawn-page event (2-19 %); one
        per step and per tenth of it, not one per megabyte."""
        try:
            event = json.loads(line)
        except ValueError:
            return  # the image's path, printed at the end
        fraction = event.get("fraction")
        seen = (event["step"], None if fraction is None else int(fraction * 10))
        if seen in self._pull_seen:
            return
        self._pull_seen.add(seen)
        weight = {"resolve": 0, "download": 1, "unpack": 2, "done": 3}.get(event["step"], 1)
        # Layers unpack while others download: the bar only moves forward.
        self._pull_percent = max(getattr(self, "_pull_percent", 0),
                                 2 + 5 * weight + int(5 * (fraction or 0)))
        self._emit(self._pull_percent, f"image {self.image}: {event['message']}"
                   + (f" ({100 * fraction:.0f}%)" if fraction is not None else ""))

    def container_argv(self) -> list[str]:
        """Server mode: the single-user server in the image, with the user's
        home bound at /home/$USER and the image's environment."""
        spec = RunSpec(image=str(self.store_for(self.image).runnable(self.image)),
                       command=[*self.image_cmd, *self.get_args()], binds=list(self.binds),
                       devices=self.container_devices(),
                       home=True, image_env=True, cwd=f"/home/{self.user.name}")
        return to_argv(spec, self.backend)

    def _emit(self, progress: int, message: str) -> None:
        events = getattr(self, "_events", None)
        if events is not None:  # (nobody follows a re-attach after a hub restart)
            events.put_nowait({"progress": progress, "message": message})

    async def progress(self):
        """What start() reports, as it happens; the hub adds 'ready'."""
        events = getattr(self, "_events", None)
        if events is None:
            return
        while True:
            event = await events.get()
            yield event
            if event["progress"] >= 60:
                return

    # ------------------------------------------------------------- state --

    def get_state(self) -> dict:
        state = super().get_state()
        if self.image:
            state.update(image=self.image, mode=self.mode)
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.image = state.get("image", "")
        self.mode = state.get("mode", "")

    def clear_state(self) -> None:
        super().clear_state()
        self.image = self.mode = ""


class SpawnFailed(SpawnerError):
    """A spawn that can't go on once started (the server or its job ended
    first, a port taken, a pull failed): the hub shows its message as it is."""

    REASON = "start"
    STATUS = 500
