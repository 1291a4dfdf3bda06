"""The ``chspawner`` command.

``chspawner run`` is the hot path: it goes straight to the stdlib launcher
without importing argparse or anything else. Every other subcommand is
parsed with argparse, which is only imported for them.

Exit status: 0 success, 1 the operation failed (one line on stderr saying
why), 64 usage error; ``run`` has ch-run's (see its --help).
"""
from __future__ import annotations

import sys

EXIT_FAILED = 1
EXIT_USAGE = 64


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "run":
        from chspawner.runtime import launcher
        return launcher.main(argv[1:])
    return _main(argv)


def _parser():
    import argparse

    from chspawner import __version__

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, and ch-run's usage status
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message} "
                                  f"(see '{self.prog} --help')\n")

    parser = Parser(prog="chspawner",
                    description="Jupyter in your own container images, unprivileged.")
    parser.add_argument("--version", action="version", version=__version__)
    # Accepted before or after a subcommand; SUPPRESS keeps a subparser's
    # default from overwriting what was given before it.
    common = Parser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("-s", "--storage", metavar="DIR",
                        help="image store (default $CH_IMAGE_STORAGE or /var/tmp/$USER.ch)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    common.add_argument("--json-progress", action="store_true",
                        help="progress as one JSON object per line on stdout "
                             "(for programs following the work)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=Parser)
    commands.add_parser("run", add_help=False,
                        help="run a command in an image (ch-run's options; "
                             "'chspawner run --help' for them)")

    p = commands.add_parser("import", parents=[common],
                            help="import an image from a directory, tarball, "
                                 "docker save archive or OCI layout")
    p.add_argument("source", metavar="SRC")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--arch", help="platform to take from a multi-arch OCI layout "
                                  "(default: this machine's)")
    _max_size_option(p)

    p = commands.add_parser("pull", parents=[common],
                            help="pull an image from an OCI registry")
    p.add_argument("ref", metavar="REF", help="[REGISTRY/]REPOSITORY[:TAG][@DIGEST]")
    p.add_argument("name", metavar="NAME", nargs="?",
                   help="name in the store (default: REF)")
    p.add_argument("--arch", help="platform in a multi-arch image "
                                  "(default: this machine's)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP, for a registry without TLS")
    p.add_argument("-j", "--jobs", type=int, default=4,
                   help="layers downloaded at once (default 4)")
    _max_size_option(p)
    p.add_argument("--stall-seconds", type=_positive(float), metavar="S",
                   help="fail when a request gets fewer than --stall-bytes in S "
                        "seconds (default $CHSPAWNER_PULL_STALL_SECONDS, or 60)")
    p.add_argument("--stall-bytes", type=_positive(int), metavar="N",
                   help="see --stall-seconds (default $CHSPAWNER_PULL_STALL_BYTES, "
                        "or 65536)")

    p = commands.add_parser("kernel", parents=[common],
                            help="Jupyter kernels inside images")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    sub.add_parser("list", parents=[common], help="kernels offered: native and in images")
    a = sub.add_parser("install", parents=[common],
                       help="write a kernelspec that runs an image's kernel")
    a.add_argument("image", metavar="IMAGE")
    a.add_argument("--name", help="kernelspec name (default: from the image)")
    a.add_argument("--display-name", help="name in the kernel picker")
    a.add_argument("--bind", "-b", action="append", default=[], metavar="SRC[:DST]",
                   help="bind a host directory into the kernel's container")
    a.add_argument("--home", action=argparse.BooleanOptionalAction, default=True,
                   help="bind your $HOME at /home/$USER in the container, so that a "
                        "notebook's kernel sees the files beside it (--no-home: no "
                        "view of it, except on a compute node, where the kernel's "
                        "files live there)")
    a.add_argument("--backend", choices=("builtin", "ch-run"), default="builtin")
    a.add_argument("--launcher", choices=("local", "srun", "sbatch"), default="local",
                   help="where the kernel runs: here, or on a compute node via srun, "
                        "or as a batch job of its own (sbatch)")
    a.add_argument("--srun-arg", action="append", default=[], metavar="ARG",
                   help="an srun option for the kernel's job, e.g. --partition=gpu")
    a.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="an sbatch option for the kernel's job, e.g. --time=8:00:00")
    a.add_argument("--jobid", help="run in this existing allocation (srun --jobid)")
    a.add_argument("--prefix", help="install under PREFIX/share/jupyter "
                                    "(default: your Jupyter data directory)")

    p = commands.add_parser("images", parents=[common], help="list and manage images")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    sub.add_parser("list", parents=[common], help="list images (the default)")
    for action, text in (("inspect", "show an image's metadata as JSON"),
                         ("path", "print an image's directory"),
                         ("rm", "remove images")):
        a = sub.add_parser(action, parents=[common], help=text)
        a.add_argument("names", metavar="NAME", nargs="+" if action == "rm" else 1)
    a = sub.add_parser("squash", parents=[common],
                       help="keep images also as one SquashFS file each (img/NAME.sqfs), "
                            "which containers then start from, mounted in place: one file "
                            "on the store's file system instead of a tree (needs "
                            "mksquashfs, from squashfs-tools)")
    a.add_argument("--compression", choices=("zstd", "lz4", "gzip", "none"), default="zstd",
                   help="zstd (the default) makes the smallest file; none starts "
                        "containers fastest (no block to decompress), at ~3x the size")
    a.add_argument("names", metavar="NAME", nargs="+")
    a = sub.add_parser("refresh", parents=[common],
                       help="measure images again and record their size, kernels and "
                            "description (for images made before records, or changed "
                            "by hand)")
    a.add_argument("names", metavar="NAME", nargs="*",
                   help="the images to refresh (default: all)")

    p = commands.add_parser("sessions", help="list the session manager's sessions "
                                             "(its HTTP API; docs/admin/sessions.md)")
    p.add_argument("--url", help="the session manager's URL, e.g. "
                                 "https://hub.example.org/services/session-manager/ "
                                 "(default $CHSPAWNER_SESSIONS_URL)")
    p.add_argument("--token", help="a JupyterHub token: an admin's lists everyone's "
                                   "sessions, a user's their own "
                                   "(default $JUPYTERHUB_API_TOKEN)")
    p.add_argument("--user", help="only this user's sessions")
    p.add_argument("--state", choices=SESSION_STATES, help="only sessions in this state")
    p.add_argument("--since", metavar="TIME", help="only sessions created or changed "
                                                   "since TIME (ISO 8601, e.g. "
                                                   "2026-01-31T08:00:00Z)")
    p.add_argument("--limit", type=_positive(int), help="at most this many (default: "
                                                        "the manager's page size)")
    p.add_argument("--offset", type=_non_negative, default=0,
                   help="skip this many (the next page's offset is printed)")
    p.add_argument("--json", action="store_true",
                   help="the manager's answer as JSON (with each session's history)")
    return parser


SESSION_STATES = ("running", "lost", "recovering", "stopped")


def _non_negative(text: str) -> int:
    import argparse
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _positive(kind: type):
    """An argparse type: a positive, finite ``kind``."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive "
                                             f"{'integer' if kind is int else 'number'}, "
                                             f"got {text!r}")
        return value
    return parse


def _max_size_option(parser) -> None:
    import argparse

    def size(text: str) -> str:
        from chspawner.images.unpack import parse_size
        try:
            parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    parser.add_argument("--max-size", type=size, metavar="SIZE",
                        help="refuse an image bigger than SIZE unpacked, e.g. 10G "
                             "(default $CH_IMAGE_MAX_SIZE, or no limit)")


def _main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "sessions":  # no image store involved
        return cmd_sessions(args)
    import signal

    from chspawner.images import ImageError
    from chspawner.images.store import Store
    # A batch system stops work with SIGTERM: clean up as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        store = Store(getattr(args, "storage", None))
        return COMMANDS[args.command](args, store)
    except ImageError as e:
        print(f"chspawner {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"chspawner {args.command}: interrupted; nothing was changed",
              file=sys.stderr)
        return 130


def _interrupt(signum, _frame):
    raise KeyboardInterrupt


def _progress(args):
    from chspawner.images.progress import JsonProgress, ProgressBars
    if getattr(args, "json_progress", False):
        return JsonProgress()
    return ProgressBars(quiet=getattr(args, "quiet", False))


def _set_max_size(args) -> None:
    """--max-size overrides $CH_IMAGE_MAX_SIZE, which every image writer
    (import's and pull's alike) reads."""
    import os
    if args.max_size is not None:
        os.environ["CH_IMAGE_MAX_SIZE"] = args.max_size


def cmd_import(args, store) -> int:
    from chspawner.images.importer import import_image
    from chspawner.images.store import check_name
    _set_max_size(args)
    with _progress(args) as bars:
        path = import_image(args.source, check_name(args.name), store, arch=args.arch,
                            progress=bars)
    print(path)
    return 0


def cmd_pull(args, store) -> int:
    import os

    from chspawner.images.registry import (STALL_BYTES_ENV, STALL_SECONDS_ENV, StallLimit,
                                           default_name, pull)
    from chspawner.images.store import check_name
    _set_max_size(args)
    # The options override the variables, and are checked the same way.
    environ = dict(os.environ)
    for value, name in ((args.stall_seconds, STALL_SECONDS_ENV),
                        (args.stall_bytes, STALL_BYTES_ENV)):
        if value is not None:
            environ[name] = str(value)
    stall = StallLimit.from_env(environ)
    with _progress(args) as bars:
        path = pull(args.ref, check_name(args.name or default_name(args.ref)), store,
                    arch=args.arch, insecure=args.insecure, jobs=max(args.jobs, 1),
                    progress=bars, stall=stall)
    print(path)
    return 0


def cmd_images(args, store) -> int:
    import json

    from chspawner.images.progress import format_size
    action = getattr(args, "action", None) or "list"
    if action == "list":
        images = store.images()
        width = max([len(i.name) for i in images] + [4])
        print(f"{'NAME':<{width}}  {'SIZE':>9}  SOURCE")
        for i in images:
            print(f"{i.name:<{width}}  {format_size(i.size):>9}  {i.source}")
    elif action == "inspect":
        print(json.dumps(store.inspect(args.names[0]), indent=2))
    elif action == "path":
        print(store.require(args.names[0]))
    elif action == "rm":
        for name in args.names:
            store.remove(name)
    elif action == "squash":
        from chspawner.images.store import check_name
        for name in [check_name(n) for n in args.names]:
            store.require(name)  # (all named exist before any is made)
        for name in args.names:
            print(store.squash(name, args.compression, quiet=getattr(args, "quiet", False)))
    elif action == "refresh":
        from chspawner.images.store import check_name
        for name in store.refresh([check_name(n) for n in args.names] or None):
            print(f"recorded {name}")
    return 0


def cmd_kernel(args, store) -> int:
    from chspawner.images.store import check_name
    from chspawner.provisioner.kernelspecs import (ContainerKernelSpecManager, default_kernel,
                                       install_kernelspec, spec_name)
    # Asked of a store by name, a store to refuse is an error here (a
    # Jupyter server's kernel picker only leaves its kernels out).
    store.check()
    manager = ContainerKernelSpecManager(storage=str(store.root))
    if (getattr(args, "action", None) or "list") == "list":
        specs = manager.get_all_specs()
        width = max([len(n) for n in specs] + [4])
        print(f"{'NAME':<{width}}  DISPLAY NAME")
        for name, entry in sorted(specs.items()):
            print(f"{name:<{width}}  {entry['spec']['display_name']}")
        return 0
    image = check_name(args.image)
    store.require(image)
    found = [(kernel_dir.name, kernel) for (i, kernel_dir, kernel)
             in manager.image_kernels().values() if i == image]
    kernel_name, kernel = found[0] if found else ("python3", default_kernel())
    config = {"binds": args.bind, "home": args.home, "backend": args.backend,
              "storage": str(store.root), "launcher": args.launcher}
    if args.launcher == "srun":
        config.update(srun_args=args.srun_arg, jobid=args.jobid)
    elif args.launcher == "sbatch":
        config.update(sbatch_args=args.sbatch_arg)
    name = args.name or spec_name(image, kernel_name)
    display = args.display_name or f"{kernel.get('display_name', kernel_name)} — image {image}"
    print(install_kernelspec(image, kernel, name, display, config, args.prefix))
    return 0


def cmd_sessions(args) -> int:
    """A page of the session manager's sessions, over its HTTP API
    (chspawner imports nothing of session_proxy)."""
    import json
    import os

    url = args.url or os.environ.get("CHSPAWNER_SESSIONS_URL", "")
    token = args.token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    try:
        if not url:
            raise _SessionsError("no session manager URL: give --url or set "
                                 "CHSPAWNER_SESSIONS_URL")
        if not token:
            raise _SessionsError("no token: give --token or set JUPYTERHUB_API_TOKEN")
        answer = _list_sessions(url, token, user=args.user, state=args.state,
                                since=args.since, limit=args.limit,
                                offset=args.offset, history=args.json)
    except _SessionsError as e:
        print(f"chspawner sessions: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    rows = [(s["user"], s["server_name"] or "-", s["state"], str(s["recoveries"]),
             s["image"] or "-", s["target"] or "-", s["updated"][:19])
            for s in answer["sessions"]]
    header = ("USER", "SERVER", "STATE", "RECOVERIES", "IMAGE", "TARGET", "UPDATED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    shown = len(answer["sessions"])
    more = (f"; --offset {answer['next_offset']} for more"
            if answer.get("next_offset") is not None else "")
    first = answer["offset"] + 1 if shown else answer["offset"]
    print(f"{first}-{answer['offset'] + shown} of {answer['total']}{more}",
          file=sys.stderr)
    return 0


SESSIONS_TIMEOUT = 30.0


class _SessionsError(Exception):
    """Listing failed (a one-line reason)."""


def _list_sessions(url: str, token: str, *, user: str | None = None,
                   state: str | None = None, since: str | None = None,
                   limit: int | None = None, offset: int = 0,
                   history: bool = False) -> dict:
    """The manager's answer: ``{"sessions", "total", "offset", "limit",
    "next_offset"}``. Plain HTTP (urllib): chspawner imports nothing of
    session_proxy (the layers' contract); every failure is one line."""
    import json
    import urllib.error
    import urllib.request
    from urllib.parse import urlencode

    query = {name: value for name, value in (("user", user), ("state", state),
                                             ("since", since), ("limit", limit))
             if value is not None}
    query.update(offset=offset, history=int(history))
    endpoint = f"{url.rstrip('/')}/api/sessions?{urlencode(query)}"
    if not endpoint.startswith(("http://", "https://")):
        raise _SessionsError(f"{url}: not an http:// or https:// URL")
    request = urllib.request.Request(endpoint, headers={
        "Authorization": f"token {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=SESSIONS_TIMEOUT) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        raise _SessionsError(f"{endpoint.split('?')[0]}: HTTP {e.code} {e.reason}: "
                             f"{_reason(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _SessionsError(f"the session manager at {url} is unreachable: "
                             f"{reason}") from None
    try:
        answer = json.loads(body)
        answer["sessions"], answer["total"]  # noqa: B018 -- the API's shape
    except (ValueError, KeyError, TypeError):
        raise _SessionsError(f"{endpoint.split('?')[0]}: not the session manager's "
                             f"API (its answer: {body[:80]!r})") from None
    return answer


def _reason(body: bytes) -> str:
    """The manager's (or the hub's) one-line reason, else the body's start."""
    import json

    try:
        return str(json.loads(body)["message"]).splitlines()[0]
    except (ValueError, KeyError, TypeError, IndexError):
        return body[:120].decode(errors="replace").strip().splitlines()[0] \
            if body.strip() else "(no reason given)"


COMMANDS = {"import": cmd_import, "pull": cmd_pull, "images": cmd_images,
            "kernel": cmd_kernel}


if __name__ == "__main__":
    sys.exit(main())
