"""What the admin and the users choose: the admin's image list (checked
when the configuration is loaded) and the spawn form (rendered from a
template shipped with the package, autoescaped)."""
from __future__ import annotations

from functools import cache
from typing import Any

import jinja2
from tornado import web
from traitlets import TraitError

from chspawner.images import ImageError
from chspawner.images.store import check_name
from chspawner.runtime.spec import Bind

#: The keys of an entry of ``images``, and their JSON types.
IMAGE_KEYS: dict[str, type] = {"name": str, "description": str, "pull": str, "insecure": bool,
                               "modes": list, "groups": list, "move_at_walltime": bool}

#: The modes a server may run in.
MODES = ("kernels", "server")

#: Characters refused in any option a user gives: a shell's, whitespace
#: and control characters. Options reach sbatch and the container as
#: separate arguments, never through a shell; refusing these anyway keeps
#: a later change from making one a command.
UNSAFE = frozenset(";&|$`<>()\\\"'*?[]{}!#~")

#: The longest option a user may give (characters): far above any image,
#: partition, account or QOS name, and it keeps every message one short line.
MAX_LENGTH = 200


try:
    from jupyterhub.spawner import SpawnException  # JupyterHub 6
except ImportError:  # JupyterHub 5: the same contract, here
    class SpawnException(web.HTTPError):  # type: ignore[no-redef]
        """JupyterHub 6's policy failure of a spawn, for JupyterHub 5."""

        def __init__(self, message: str, *, reason: str, log_message: str = "",
                     message_html: str = "", status_code: int = 400):
            super().__init__(status_code, None, reason=reason)
            self.message, self.message_html = message, message_html
            self.log_message = log_message or message


class SpawnerError(SpawnException):
    """A spawn that can't go on, as JupyterHub's SpawnException: a one-line
    message that JupyterHub shows the user as it is (on the spawn form and
    page: ``jupyterhub_message``; in the REST API's reply) and logs in one
    line, without a traceback."""

    REASON = "error"
    STATUS = 400

    def __init__(self, message: str):
        super().__init__(message, reason=self.REASON, status_code=self.STATUS)
        # (tornado formats log_message with %: a literal one is doubled.)
        self.log_message = message.replace("%", "%%")
        self.jupyterhub_message = message

    def __str__(self) -> str:
        return self.message


class OptionError(SpawnerError):
    """A mistake in a user's options: a 400."""

    REASON = "user_options"


def check_plain(key: str, value: str) -> None:
    """OptionError unless ``value`` is plain text: no shell metacharacter,
    no whitespace, no control character (a newline would be a second line
    of a job's script), at most MAX_LENGTH characters."""
    if len(value) > MAX_LENGTH:
        raise OptionError(f"{key} is too long ({len(value)} characters; at most "
                          f"{MAX_LENGTH})")
    bad = next((c for c in value if c in UNSAFE or not c.isprintable() or c.isspace()), None)
    if bad is not None:
        raise OptionError(f"{key} may not contain {bad!r}")


def check_binds(entries: list[str], trait: str = "binds") -> list[str]:
    """``entries`` if each is ``SRC[:DST]`` with absolute paths, else a
    TraitError naming the entry: a relative source would be read from
    wherever the server or kernel happens to start."""
    for i, text in enumerate(entries):
        try:
            bind = Bind.parse(text)
        except ValueError as e:
            raise TraitError(f"{trait}[{i}]: {e}") from None
        if not bind.src.startswith("/"):
            raise TraitError(f"{trait}[{i}]: bind source must be an absolute path: "
                             f"{bind.src!r}")
    return entries


def check_devices(entries: list[str], trait: str = "devices") -> list[str]:
    """``entries`` if each names CDI devices as ``chspawner run --device``
    takes them (``vendor.com/class[=NAME]``, or a spec file's absolute
    path), else a TraitError naming the entry."""
    for i, text in enumerate(entries):
        kind = text.partition("=")[0]
        vendor, slash, cls = kind.partition("/")
        if not text.startswith("/") and not (slash and vendor and cls and "/" not in cls):
            raise TraitError(f"{trait}[{i}]: not a CDI device (vendor.com/class=NAME, "
                             f"vendor.com/class, or a spec file's path): {text!r}")
    return entries


def shown(name: object) -> str:
    """An option's name as a message shows it: as it is if plain and short,
    else quoted and cut (a user's key with a newline, or of a megabyte, must
    not make the message two lines, or a long one)."""
    text = str(name)
    if len(text) <= 40 and text.isprintable() and not any(c.isspace() for c in text):
        return text
    quoted = repr(text)
    return quoted if len(quoted) <= 40 else quoted[:37] + "..."


def check_images(entries: Any, trait: str = "images") -> list[dict]:
    """``entries`` if it is a good image list, else a TraitError that says
    which entry is wrong and why, in one line: each entry an object with a
    valid image "name" (listed once), and optional "description", "pull"
    and "insecure" of their types; an unknown key is refused, not ignored
    (a misspelt "pul" would never pull)."""
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{trait}[{i}]"
        if not isinstance(entry, dict):
            raise TraitError(f"{where} must be a dict with a 'name', not {entry!r}")
        unknown = sorted(map(str, set(entry) - set(IMAGE_KEYS)))
        if unknown:
            raise TraitError(f"{where}: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(IMAGE_KEYS)})")
        if "name" not in entry:
            raise TraitError(f"{where} has no 'name'")
        for key, kind in IMAGE_KEYS.items():
            if key in entry and not isinstance(entry[key], kind):
                raise TraitError(f"{where}: {key!r} must be {kind.__name__}, "
                                 f"not {type(entry[key]).__name__}")
        try:
            check_name(entry["name"])
        except ImageError as e:
            raise TraitError(f"{where}: {e}") from None
        for key in ("modes", "groups"):
            if not all(isinstance(v, str) for v in entry.get(key, [])):
                raise TraitError(f"{where}: {key!r} must be a list of strings")
        wrong = sorted(set(entry.get("modes", [])) - set(MODES))
        if wrong:
            raise TraitError(f"{where}: unknown mode(s) {', '.join(wrong)} "
                             f"(known: {', '.join(MODES)})")
        if entry["name"] in seen:
            raise TraitError(f"{where}: image {entry['name']!r} is listed twice")
        seen.add(entry["name"])
    return entries


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


def own_image_description(description: str, source: str) -> str:
    """How the form describes a user's own image: by its recorded
    description (its OCI description label, chspawner.images.records), else
    by where it came from. Read from the image's record: no walk."""
    return f"your image: {description}" if description else f"your image, from {source}"


@cache
def _templates() -> jinja2.Environment:
    # Autoescaped: descriptions and names are the admin's text, and
    # partition names are too; none of it is markup.
    return jinja2.Environment(loader=jinja2.PackageLoader("chspawner.spawners", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def render_form(context: dict[str, Any], template: str = "options_form.html") -> str:
    """The spawn form's HTML.

    ``context``: ``images`` [(name, description, modes)] (modes: the
    image's own, [] for all), ``modes`` [mode] (the first checked),
    ``choices`` [{name, label, values}] (select fields: partition,
    account, QOS; a field with one value or none is not shown) and
    ``numbers`` [{name, label, min, max, value}], number fields."""
    return _templates().get_template(template).render(context)
