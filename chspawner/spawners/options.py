"""What the admin and the users choose: the admin's image list (checked
when the configuration is loaded) and the spawn form (rendered from a
template shipped with the package, autoescaped)."""
from __future__ import annotations

from functools import cache
from typing import Any

import jinja2
from traitlets import TraitError

from chspawner.images import ImageError
from chspawner.images.store import check_name

#: The keys of an entry of ``images``, and their JSON types.
IMAGE_KEYS: dict[str, type] = {"name": str, "description": str, "pull": str, "insecure": bool}


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


@cache
def _templates() -> jinja2.Environment:
    # Autoescaped: descriptions and names are the admin's text, and
    # partition names are too; none of it is markup.
    return jinja2.Environment(loader=jinja2.PackageLoader("chspawner.spawners", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def render_form(context: dict[str, Any], template: str = "options_form.html") -> str:
    """The spawn form's HTML.

    ``context``: ``images`` [(name, description)], ``modes`` [mode] (the
    first checked), ``partitions`` [name] (none: no partition field) and
    ``numbers`` [{name, label, min, max, value}], number fields."""
    return _templates().get_template(template).render(context)
