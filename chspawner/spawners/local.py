"""JupyterHub spawners that put users' servers and kernels in images.

``ChSpawner`` is JupyterHub's LocalProcessSpawner (the hub, as root, starts
the server as the user's own account) with a choice of image and mode:

* ``kernels``: the single-user server runs natively and offers the image's
  kernels in its kernel picker (they run in the image through the
  chspawner kernel provisioner);
* ``server``: the single-user server itself runs inside the image, started
  through the one RunSpec (the image must provide jupyterhub-singleuser).

The admin lists the images users may pick (``images``, in the site store
``site_storage``) and may allow users' own stored images. User options come
from the form or the REST API and are validated before anything changes:
a bad one is a 400 with a message that says what is wrong.
"""
from __future__ import annotations

import asyncio
import hashlib
import html
import json
import os
import pwd
import secrets
import shlex
import socket
import sys
from pathlib import Path

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.spawner import LocalProcessSpawner
from jupyterhub.utils import random_port
from tornado import web
from traitlets import Bool, Dict, Float, Integer, List, Unicode, default

from chspawner.images import ImageError
from chspawner.images.store import Store, StoreError, check_name
from chspawner.spawners.listening import MINE, NONCE_ENV, TAKEN, listener_uids, port_owner, read_report
from chspawner.runtime.spec import RunSpec, to_argv
from chspawner.slurm import ACTIVE_STATES, SlurmError, job_status, slurm_command

MODES = ("kernels", "server")
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
        without TLS.""",
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
    binds = List(Unicode(), help="Host paths bound into every container (SRC[:DST]).",
                 ).tag(config=True)
    image_cmd = List(
        Unicode(), ["jupyterhub-singleuser"],
        help="The single-user server's command inside an image (server mode), "
             "found on the image's PATH.",
    ).tag(config=True)
    persistent_kernels = Bool(
        True, help="Kernels mode: kernels outlive their server (session_proxy's "
                   "kernel manager): a server started again (by the session manager, "
                   "after a loss) takes them over, and replays the output its "
                   "clients missed.",
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

    @default("apply_user_options")
    def _default_apply_user_options(self):
        return lambda spawner, options: spawner.validate_user_options(options)

    # ---------------------------------------------------- user options ---

    def offered_images(self) -> dict[str, str]:
        """{name: description} a user may choose from."""
        offered = {i["name"]: i.get("description", "") for i in self.images if "name" in i}
        if self.allow_user_images:
            try:
                images = self.user_store().images()
            except StoreError as e:
                # Planted by another user, or open to them: not offered.
                self.log.warning("not offering %s's own images: %s", self.user.name, e)
                images = []
            for info in images:
                offered.setdefault(info.name, f"your image, from {info.source}")
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

    #: The options a user may give, and their JSON types.
    OPTION_TYPES: dict[str, type] = {"image": str, "mode": str}

    def validate_user_options(self, options: dict) -> None:
        """Check the options, then set ``image`` and ``mode``: nothing
        changes unless all of them are good. Types are checked before
        values: ``{"image": 0}`` is refused, not read as "the default"."""
        self.check_option_types(options)
        offered = self.offered_images()
        # An option left out (or left empty, as the form leaves a choice
        # it doesn't offer) takes its default.
        image = options.get("image") or next(iter(offered), "")
        mode = options.get("mode") or (self.modes[0] if self.modes else "")
        try:
            check_name(image)
        except ImageError as e:
            raise web.HTTPError(400, str(e)) from None
        if image not in offered:
            raise web.HTTPError(400, f"image {image!r} is not offered here")
        if mode not in self.modes:
            raise web.HTTPError(400, f"mode {mode!r} is not offered "
                                     f"(offered: {', '.join(self.modes)})")
        store = self.store_for(image)
        try:
            if not store.exists(image) and (self.site_entry(image) or {}).get("pull"):
                problem = None  # pulled when the spawn starts
            else:
                problem = self.server_mode_problem(image, mode, store.require(image))
        except ImageError as e:  # missing, or a store that must be refused
            raise web.HTTPError(400, str(e)) from None
        if problem:
            raise web.HTTPError(400, problem)
        self.image, self.mode = image, mode

    def check_option_types(self, options: object) -> None:
        """A 400 unless ``options`` is an object of known options, each of
        its type. Unknown options are refused, not ignored: a misspelt one
        would otherwise spawn the defaults without a word."""
        self._refuse_non_object_body()
        if not isinstance(options, dict):
            raise web.HTTPError(400, f"the options must be a JSON object, not "
                                     f"{json_type(options)}")
        unknown = set(options) - set(self.OPTION_TYPES)
        if unknown:
            raise web.HTTPError(400, f"unknown options: {', '.join(sorted(map(str, unknown)))}")
        for key, kind in self.OPTION_TYPES.items():
            value = options.get(key)
            if key in options and not (isinstance(value, kind)
                                       and not isinstance(value, bool)):
                raise web.HTTPError(400, self.type_problem(key, value))

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
            raise web.HTTPError(400, f"the request body must be a JSON object, not "
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
        choices = "".join(
            f'<option value="{html.escape(name)}">{html.escape(name)}'
            f'{" — " + html.escape(text) if text else ""}</option>'
            for name, text in self.offered_images().items())
        modes = "".join(
            f'<label><input type="radio" name="mode" value="{m}"'
            f'{" checked" if i == 0 else ""}> {m}</label> '
            for i, m in enumerate(self.modes))
        return (f'<label for="image">Image</label>'
                f'<select class="form-control" name="image" id="image">{choices}</select>'
                f'<p>Run: {modes}</p>')

    def options_from_form(self, formdata: dict) -> dict:
        return {key: formdata[key][0] for key in ("image", "mode") if formdata.get(key)}

    # ------------------------------------------------------------ launch --

    def get_args(self) -> list[str]:
        if getattr(self, "_args_in_cmd", False):
            return []
        args = super().get_args()
        # The server's own kernels on Unix sockets in its private runtime
        # directory, not on TCP ports other users could read (both modes).
        args += ["--KernelManager.transport=ipc"]
        if self.mode == "kernels":
            store = self.store_for(self.image)
            args += ["--ServerApp.kernel_spec_manager_class="
                     "chspawner.provisioner.kernelspecs.ContainerKernelSpecManager",
                     f"--ContainerKernelSpecManager.storage={store.root}",
                     # One item per flag: the server doesn't know this class
                     # up front, so a list literal would stay one string.
                     f"--ContainerKernelSpecManager.only_images={self.image}"]
            if self.persistent_kernels:
                args += ["--ServerApp.kernel_manager_class="
                         "chspawner.persist.kernel_manager.PersistentKernelManager",
                         "--ServerApp.kernel_websocket_connection_class="
                         "chspawner.persist.kernel_connection.ReplayingKernelConnection",
                         "--ServerApp.session_manager_class="
                         "chspawner.persist.notebook_sessions.PersistentSessionManager"]
        return args

    async def start(self):
        self._events = asyncio.Queue()
        await self.ensure_image()
        self._emit(20, f"starting the {self.mode} mode with image {self.image}")
        self.pick_port()
        if self.mode != "server":
            ip, port = await super().start()
            self._emit(40, f"server started on {socket.gethostname()}; "
                           f"kernels run in image {self.image}")
        else:
            saved, self.cmd, self._args_in_cmd = self.cmd, self.container_argv(), True
            try:
                ip, port = await super().start()
            finally:
                self.cmd, self._args_in_cmd = saved, False
            self._emit(40, f"container started on {socket.gethostname()}, "
                           f"image {self.image}")
        await self._wait_listening(port)
        self._emit(60, "server responding")
        return ip, port

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
        spec = RunSpec(image=str(self.store_for(self.image).require(self.image)),
                       command=[*self.image_cmd, *self.get_args()], binds=list(self.binds),
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


class SlurmChSpawner(ChSpawner):
    """The user's server as a Slurm job on a compute node, in an image or
    with its kernels in one (the same modes as ChSpawner).

    The hub chooses the server's port itself and passes it on the command
    line, so nothing reports back from the node: there is no report handler
    for a user's token to abuse. The job id is saved in the hub's database
    the moment sbatch answers, so a hub restarted during the queue wait
    knows the job: it is stopped (cancelled) rather than orphaned, or taken
    over by the next spawn request while still queued. User options for Slurm
    (partition, time, CPUs, memory) are checked against the admin's bounds
    and reach sbatch as separate arguments, never through a shell or the
    batch script's text.
    """

    partitions = List(Unicode(), help="Partitions users may choose (the first is the "
                      "default; empty: Slurm's default).").tag(config=True)
    max_cpus = Integer(8, help="Most CPUs a user may ask for.").tag(config=True)
    max_mem_gb = Integer(32, help="Most memory (GB) a user may ask for.").tag(config=True)
    max_hours = Integer(12, help="Longest time limit (hours) a user may ask for.").tag(
        config=True)
    max_gpus = Integer(0, help="Most GPUs a user may ask for (0: the form offers "
                       "none; asked for with sbatch --gpus).").tag(config=True)
    slurm_env = Dict(Unicode(), help="Extra environment for Slurm commands "
                     "(e.g. SLURM_CONF).").tag(config=True)
    # (Not "poll_interval": that is JupyterHub's, for polling running servers.)
    queue_poll_interval = Float(0.5, help="Seconds between squeue calls while the job "
                          "is queued.").tag(config=True)

    kernel_jobs = Bool(
        True, help="Kernels mode with persistent_kernels: each kernel runs as a Slurm "
                   "job of its own (with the user's request), so that it outlives the "
                   "server's job: a server whose job is cancelled, times out or loses "
                   "its node is started again and takes its kernels over. False: "
                   "kernels run inside the server's job and end with it.",
    ).tag(config=True)
    kernel_sbatch_args = List(
        Unicode(), help="More sbatch options for each kernel's job (kernel_jobs), "
                        "e.g. --account=...; they come after the user's request.",
    ).tag(config=True)
    stop_timeout = Float(
        10.0, help="Seconds a server asked to stop (SIGINT, as the hub asks a local "
                   "one) gets to shut its kernels down before its job is cancelled.",
    ).tag(config=True)

    report_dir = Unicode(
        "{home}/.local/share/chspawner/servers",
        help="Where a server's job reports, on its node, that the user's own "
             "process listens on the server's port ({home}: the user's home, shared "
             "with the nodes; only the user may write there, and the hub must be able "
             "to read it). The hub routes to the server only after that report.",
    ).tag(config=True)

    job_id = Unicode("", help="The server's Slurm job (state).")
    spawn_nonce = Unicode("", help="This spawn's random token, which its job's "
                                   "listening report must carry (state).")
    node = Unicode("", help="Where it runs (state).")
    request = Dict(help="The validated Slurm request of this spawn.")

    RESOURCES = ("partition", "cpus", "mem_gb", "hours", "gpus")

    @default("ip")
    def _default_ip(self):
        return "0.0.0.0"  # the hub connects to the node

    OPTION_TYPES = {**ChSpawner.OPTION_TYPES, "partition": str, "cpus": int,
                    "mem_gb": int, "hours": int, "gpus": int}

    def validate_user_options(self, options: dict) -> None:
        self.check_option_types(options)
        slurm = {k: options[k] for k in self.RESOURCES if k in options}
        request = self.default_request()
        for key, value in slurm.items():
            if key == "partition":
                if value not in self.partitions:
                    raise web.HTTPError(400, f"partition {value!r} is not offered "
                                             f"(offered: {', '.join(self.partitions)})")
            else:
                low, high = self.bounds()[key]
                if not low <= value <= high:
                    raise web.HTTPError(400, self.type_problem(key, value))
            request[key] = value
        super().validate_user_options({k: v for k, v in options.items()
                                       if k not in slurm})
        self.request = request

    def type_problem(self, key: str, value: object) -> str:
        if key in self.bounds():
            low, high = self.bounds()[key]
            return f"{key} must be a whole number from {low} to {high}"
        return super().type_problem(key, value)

    def default_request(self) -> dict:
        return {"partition": self.partitions[0] if self.partitions else "",
                "cpus": 1, "mem_gb": min(2, self.max_mem_gb), "hours": 1, "gpus": 0}

    def bounds(self) -> dict[str, tuple[int, int]]:
        return {"cpus": (1, self.max_cpus), "mem_gb": (1, self.max_mem_gb),
                "hours": (1, self.max_hours), "gpus": (0, self.max_gpus)}

    def render_options_form(self, spawner=None) -> str:
        """ChSpawner's image and mode, then the Slurm request within bounds."""
        default = self.default_request()
        fields = ""
        if self.partitions:
            choices = "".join(f'<option value="{html.escape(p)}">{html.escape(p)}</option>'
                              for p in self.partitions)
            fields += (f'<label for="partition">Partition</label><select '
                       f'class="form-control" name="partition" id="partition">{choices}'
                       f'</select>')
        labels = {"cpus": "CPUs", "mem_gb": "Memory (GB)", "hours": "Hours",
                  "gpus": "GPUs"}
        for key, (low, high) in self.bounds().items():
            if high < max(low, 1):
                continue  # (no GPUs offered)
            fields += (f'<label for="{key}">{labels[key]}</label><input '
                       f'class="form-control" type="number" name="{key}" id="{key}" '
                       f'min="{low}" max="{high}" value="{default[key]}">')
        return super().render_options_form(spawner) + fields

    def options_from_form(self, formdata: dict) -> dict:
        options = super().options_from_form(formdata)
        for key in self.RESOURCES:
            value = (formdata.get(key) or [""])[0]
            if value:
                # ASCII digits alone: "²" and "٣" are digits to str.isdigit()
                # but not to int(); anything else stays text, for
                # validate_user_options to refuse with the field's bounds.
                options[key] = int(value) if value.isascii() and value.isdigit() else value
        return options

    def kernels_in_jobs(self) -> bool:
        return self.mode == "kernels" and self.persistent_kernels and self.kernel_jobs

    def server_request(self) -> dict:
        """What the server's own job asks for: the user's request; or, when
        kernels run in jobs of their own (which get the user's request),
        what a Jupyter server needs: 1 CPU, at most 2 GB, no GPU."""
        r = self.request or self.default_request()
        if self.kernels_in_jobs():
            return {**r, "cpus": 1, "mem_gb": min(r["mem_gb"], 2), "gpus": 0}
        return r

    def get_args(self) -> list[str]:
        args = super().get_args()
        if self.kernels_in_jobs() and not getattr(self, "_args_in_cmd", False):
            config = {"launcher": "sbatch", "sbatch_args": [
                *self._resource_args(self.request or self.default_request()),
                *self.kernel_sbatch_args]}
            args += [f"--ContainerKernelSpecManager.provisioner_config={json.dumps(config)}",
                     # A job's end (scancel, its time limit, a preemption)
                     # sends SIGTERM: that is a loss, not the user's stop.
                     "--PersistentKernelManager.keep_kernels_on_sigterm=True"]
        return args

    @staticmethod
    def _resource_args(r: dict) -> list[str]:
        """sbatch options for a request (the server's job and kernels' jobs)."""
        args = [f"--cpus-per-task={r['cpus']}", f"--mem={r['mem_gb']}G",
                f"--time={r['hours']}:00:00"]
        if r["partition"]:
            args.append(f"--partition={r['partition']}")
        if r.get("gpus"):
            args.append(f"--gpus={r['gpus']}")
        return args

    # ------------------------------------------------------------ Slurm --

    async def slurm(self, *argv: str, env: dict | None = None) -> str:
        """Run a Slurm command as the user; its stdout, or SlurmError."""
        return await slurm_command(
            *argv, env={**(env or {"PATH": "/usr/local/bin:/usr/bin:/bin"}), **self.slurm_env},
            preexec_fn=self.make_preexec_fn(self.user.name))

    async def job_status(self) -> tuple[str, str, str]:
        """(state, node, reason) of the job; state '' once it is gone."""
        return await job_status(self.job_id, run=self.slurm)

    async def start(self):
        self._events = asyncio.Queue()
        if self.job_id and await self._job_alive():
            # A job from before a hub restart (queued or starting): take it
            # over rather than submit a second one.
            self._emit(10, f"re-attaching to Slurm job {self.job_id}")
            return await self._wait_running()
        self.job_id = self.node = ""
        # On the hub's host, into the shared store: compute nodes never
        # talk to a registry.
        await self.ensure_image()
        self.pick_port()
        self.spawn_nonce = secrets.token_hex(16)
        command = (self.container_argv() if self.mode == "server"
                   else [*self.cmd, *self.get_args()])
        sbatch = ["sbatch", "--parsable", f"--job-name=jupyterhub-{self.user.name}",
                  *self._resource_args(self.server_request()), "--export=ALL",
                  f"--chdir={self._home_dir()}", "--output=/dev/null"]
        # The command travels as the wrap's arguments, quoted once, here.
        # Beside it (before the exec: the server stays the job's script,
        # which scancel --batch signals) runs the check that the port is
        # the user's own (see _proven).
        watch = [sys.executable, "-m", "chspawner.spawners.listening", "--port", str(self.port),
                 "--report", str(self.report_path()), "--timeout", str(self.start_timeout)]
        sbatch.append("--wrap=" + " ".join(shlex.quote(a) for a in watch)
                      + " </dev/null >/dev/null 2>&1 & exec "
                      + " ".join(shlex.quote(a) for a in command))
        env = {**self.get_env(), NONCE_ENV: self.spawn_nonce}
        try:
            self.job_id = (await self.slurm(*sbatch, env=env)).strip().split(";")[0]
        except SlurmError as e:
            raise SpawnFailed(f"can't submit the server's job: {e}") from None
        self._save_state()
        self._emit(10, f"submitted Slurm job {self.job_id}")
        return await self._wait_running()

    async def _wait_running(self):
        """Follow the job until its server answers on the node, reporting
        queue states; a job that ends first ends the spawn at once, with
        its state (not after the hub's http_timeout)."""
        if not self.spawn_nonce:
            raise SpawnFailed(f"Slurm job {self.job_id} was submitted by an earlier "
                              "chspawner, which did not check whose process listens on "
                              "its port, so it is not connected to; start your server again")
        last = None
        while True:
            try:
                state, node, reason = await self.job_status()
            except SlurmError as e:
                # A controller restart or outage is no reason to give up on
                # the job: keep asking (the hub's start_timeout bounds it).
                if last != "unreachable":
                    self._emit(30, f"can't reach Slurm ({e}); still trying")
                    last = "unreachable"
                await asyncio.sleep(self.queue_poll_interval)
                continue
            report = self._report()
            if report and report["status"] == TAKEN:
                # (Its server can't listen there: the job ends, if it has
                # not yet; the hub stops it, which cancels it.)
                raise SpawnFailed(f"port {self.port} on node {report.get('node')} is taken "
                                  "by another user's process; your server was not "
                                  "connected to it. " + self.port_advice())
            if state in ("", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "COMPLETED",
                         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
                raise SpawnFailed(f"Slurm job {self.job_id} ended before the server "
                                  f"answered ({state or 'gone'}"
                                  f"{', ' + reason if reason not in ('', 'None') else ''})")
            if state == "RUNNING" and node and not self.node:
                self.node = node
                self._save_state()
                self._emit(40, f"job {self.job_id} running on {node}, mode {self.mode}, "
                               f"image {self.image}")
            if self.node and self._proven(report) and await _answers(self.node, self.port):
                self._emit(60, f"server responding on {self.node}")
                return self.node, self.port
            if (state, reason) != last and state != "RUNNING":
                self._emit(30, f"job {self.job_id} {state.lower()}"
                               + (f" ({reason})" if reason and reason != "None" else "")
                               + (await self._queue_place() if state == "PENDING" else ""))
                last = state, reason
            await asyncio.sleep(self.queue_poll_interval)

    def report_path(self) -> Path:
        """This server's listening report (one file per server, rewritten
        by each spawn)."""
        home = self._home_dir()
        name = ("server" if not self.name else
                "server-" + hashlib.sha256(self.name.encode()).hexdigest()[:16])
        return Path(self.report_dir.format(home=home)) / f"{name}.json"

    def _report(self) -> dict | None:
        """The job's listening report of this spawn, if it wrote one yet."""
        if not self.spawn_nonce:
            return None
        return read_report(self.report_path(), self.user_uid(), self.spawn_nonce)

    def _proven(self, report: dict | None) -> bool:
        """Whether the job reported, from the server's node, that the
        user's own process, alone, listens on the server's port: only
        then is the server routed to. Without a nonce (a job submitted
        before chspawner checked this) nothing proves it."""
        return bool(report) and report["status"] == MINE and \
            report.get("node") == self.node and report.get("port") == self.port

    async def _queue_place(self) -> str:
        """', place 3 of 5 in the queue' (Slurm's priority order), if known."""
        try:
            out = await self.slurm("squeue", "-h", "-t", "PENDING", "--sort=-p,i",
                                   "-o", "%i", *(["-p", self.request["partition"]]
                                                 if self.request.get("partition") else []))
        except SlurmError:
            return ""
        jobs = out.split()
        if self.job_id not in jobs:
            return ""
        return f", place {jobs.index(self.job_id) + 1} of {len(jobs)} in the queue"

    async def get_url(self) -> str:
        """Where the server is, asked by a hub restarted while it was not
        yet up: a job still queued or starting is waited for (and so
        re-attached), not declared dead after http_timeout and cancelled."""
        if self.job_id and not self.node:
            try:
                await self._wait_running()
            except Exception as e:  # the hub's startup check must not fail
                self.log.warning("chspawner: job %s: %s", self.job_id, e)
                return self.server.url
        if not self.node:
            return self.server.url
        return f"{self.server.proto}://{self.node}:{self.port}{self.server.base_url}"

    async def _job_alive(self) -> bool:
        try:
            state, _, _ = await self.job_status()
        except SlurmError:
            return False
        return state in ("PENDING", "CONFIGURING", "RUNNING")

    def _home_dir(self) -> str:
        import pwd
        return pwd.getpwnam(self.user.name).pw_dir

    def _save_state(self) -> None:
        """Write the job id to the hub's database now, not only when the
        spawn ends: a hub restart in between must find the job."""
        db = getattr(self.user, "db", None)
        if self.orm_spawner is not None and db is not None:
            self.orm_spawner.state = self.get_state()
            db.commit()

    async def poll(self):
        if not self.job_id:
            return 0
        try:
            state, _, _ = await self.job_status()
        except SlurmError as e:
            # The controller being down says nothing about the server.
            self.log.warning("chspawner: can't ask Slurm about job %s: %s", self.job_id, e)
            return None
        if state in ACTIVE_STATES:
            return None
        self.clear_state()
        return 1

    async def stop(self, now=False):
        """Ask the server to stop as the hub asks a local one (SIGINT: it
        shuts its kernels down, jobs of their own included), then cancel
        its job. A plain cancel would read as a loss (SIGTERM) to a server
        that keeps its kernels for its successor."""
        if self.job_id:
            if not now and await self._job_running():
                await self._interrupt_and_wait()
            try:
                await self.slurm("scancel", self.job_id)
            except SlurmError as e:
                self.log.warning("chspawner: scancel %s: %s", self.job_id, e)
        self.clear_state()

    async def _job_running(self) -> bool:
        try:
            return (await self.job_status())[0] == "RUNNING"
        except SlurmError:
            return False

    async def _interrupt_and_wait(self) -> None:
        try:  # --batch: the job's script, which is the server (exec)
            await self.slurm("scancel", "--batch", "--signal=INT", self.job_id)
        except SlurmError as e:
            self.log.warning("chspawner: can't signal job %s: %s", self.job_id, e)
            return
        deadline = asyncio.get_running_loop().time() + self.stop_timeout
        while asyncio.get_running_loop().time() < deadline and await self._job_alive():
            await asyncio.sleep(self.queue_poll_interval)

    def get_state(self) -> dict:
        state = super().get_state()
        if self.job_id:  # (image and mode come from ChSpawner)
            # The port too: the hub records it only once start() returns.
            state.update(job_id=self.job_id, node=self.node, port=self.port,
                         spawn_nonce=self.spawn_nonce)
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.job_id = state.get("job_id", "")
        self.node = state.get("node", "")
        self.spawn_nonce = state.get("spawn_nonce", "")
        if state.get("port"):
            self.port = state["port"]

    def clear_state(self) -> None:
        super().clear_state()
        self.job_id = self.node = self.spawn_nonce = ""


class SpawnFailed(RuntimeError):
    """A spawn that can't go on; the hub shows its message as it is."""

    @property
    def jupyterhub_message(self) -> str:
        return str(self)


async def _answers(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def json_type(value: object) -> str:
    """How a JSON value's type is called in a message for the user."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    for kind, name in ((str, "a string"), ((int, float), "a number"), (dict, "an object"),
                       ((list, tuple), "an array")):
        if isinstance(value, kind):
            return name
    return type(value).__name__
