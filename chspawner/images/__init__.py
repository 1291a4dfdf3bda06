"""Where images come from: the store, imports, registry pulls, safe unpack.

See :mod:`chspawner.images.store` for the layout (Charliecloud's, so
``ch-run NAME`` finds chspawner's images too).
"""
