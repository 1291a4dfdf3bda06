"""The session layer's two programs, which talk to the rest only over HTTP:

- :mod:`session_proxy.proxy`: ``chspawner-proxy``, a configurable-http-proxy
  compatible reverse proxy that holds a lost server's route (level L1);
- :mod:`session_proxy.manager`: ``chspawner-session-manager``, the JupyterHub
  service that notices a lost server and starts it again.

Nothing here imports chspawner: the two run beside JupyterHub, not in users'
servers.
"""
