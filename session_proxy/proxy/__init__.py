"""chspawner-proxy: the session proxy (see :mod:`.app`)."""
