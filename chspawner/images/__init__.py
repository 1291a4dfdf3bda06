"""Where images come from: the store, imports, registry pulls, safe unpack.

See :mod:`chspawner.images.store` for the layout (Charliecloud's, so
``ch-run NAME`` finds chspawner's images too).
"""


class ImageError(Exception):
    """Any failure bringing an image in or managing the store. The message
    is one line, fit to show a user as it is."""
