"""The spawners' user options in a real hub: whatever the admin's own
``apply_user_options`` hook does, the spawn validates what will run; a
user's mistake reaches them as its one-line message (the REST API's reply,
the spawn form's page), not as "HTTP 400: Bad Request (...)", and changes
nothing."""
from __future__ import annotations

import asyncio
import json
import textwrap

import pytest

from tests.harness.hub import Hub, spawn, spawn_page, user_server

# The admin's hook: it reads an option of its own ("course"), and for the
# course "evil" sets the image itself, to a path out of the store.
HOOK = textwrap.dedent("""
    def apply_user_options(spawner, options):
        if options.get("course") == "evil":
            spawner.image = "../../etc"
    c.ChSpawner.apply_user_options = apply_user_options
    c.ChSpawner.extra_options = ["course"]
""")


# Images by group: the user is in "physics", not in "chemistry".
GROUPS = textwrap.dedent("""
    c.JupyterHub.load_groups = {{"physics": {{"users": ["{user}"]}}, "chemistry": {{}}}}
    c.ChSpawner.images = [
        {{"name": "deb", "description": "for everyone"}},
        {{"name": "nopython", "description": "physics", "groups": ["physics"],
          "modes": ["kernels"]}},
        {{"name": "jupyter", "description": "chemistry", "groups": ["chemistry"]}},
    ]
""")


@pytest.fixture(scope="module")
def hook_hub(user, kernel_store):
    hub = Hub(kernel_store, user.pw_name,
              extra_config=HOOK + GROUPS.format(user=user.pw_name))
    yield hub
    hub.stop()


@pytest.mark.parametrize("options, words", [
    ({"image": "deb", "course": "evil"}, "invalid image name '../../etc'"),
    ({"image": "secret", "course": "ok"}, "image 'secret' is not offered here"),
    ({"image": "deb", "course": "a;b"}, "course may not contain ';'"),
    ({"image": "deb", "mode": "kernels\nserver"}, "mode may not contain '\\n'"),
    ({"image": "jupyter"}, "image 'jupyter' is not offered here"),  # (chemistry's)
    ({"image": "nopython", "mode": "server"}, "mode 'server' is not offered for image "
                                              "nopython (offered: kernels)"),
])
def test_the_admins_hook_cant_skip_the_validation(hook_hub, options, words):
    before = len(hook_hub.log())
    result = asyncio.run(spawn(hook_hub, options))
    assert result["status"] == 400, result
    assert words in json.loads(result["reply"])["message"], result["reply"]
    assert asyncio.run(user_server(hook_hub)) == {}
    # The user's mistake is one line in the hub's log, no traceback.
    assert "Traceback" not in hook_hub.log()[before:], hook_hub.log()[before:]


@pytest.mark.parametrize("fields, words", [
    ({"image": "deb;id"}, "image may not contain &#39;;&#39;"),
    ({"image": "secret"}, "image &#39;secret&#39; is not offered here"),
])
def test_the_spawn_page_shows_the_users_mistake_as_a_message(hook_hub, fields, words):
    status, page = asyncio.run(spawn_page(hook_hub, fields))
    assert status == 400, page[-2000:]
    assert words in page, page[-3000:]
    assert "HTTP 400" not in page and "Bad Request" not in page
    assert asyncio.run(user_server(hook_hub)) == {}


def test_the_form_offers_the_images_of_the_users_groups(hook_hub):
    status, page = asyncio.run(spawn_page(hook_hub))
    assert status == 200, page[-2000:]
    assert '<option value="deb">deb — for everyone</option>' in page
    assert ('<option value="nopython" data-modes="kernels">nopython — physics '
            '(kernels only)</option>') in page
    assert 'value="jupyter"' not in page
