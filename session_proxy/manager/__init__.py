"""chspawner-session-manager: the hub service that brings lost sessions back
(see :mod:`.app`)."""
