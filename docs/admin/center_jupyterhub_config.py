# A center's JupyterHub configuration for chspawner: the hub, the session
# proxy and the session manager on a service node; users' servers and their
# kernels as Slurm jobs on compute nodes; images in a shared store on the
# parallel file system; PostgreSQL for the hub and the session manager.
#
# Site values come first; everything below them is the same for every
# center. The multi-node tests run with this very file (the values from
# their environment), so what it says works.
import os
import secrets

# ---------------------------------------------------------- site values ---
SITE = os.environ.get
HUB_IP = SITE("CHSPAWNER_HUB_IP", "10.1.0.1")          # the service node, as nodes reach it
PUBLIC_URL = SITE("CHSPAWNER_PUBLIC_URL", "https://jupyter.example.org")
STORE = SITE("CHSPAWNER_SITE_STORE", "/gpfs/apps/chspawner/store")  # shared, read-only to users
STATE = SITE("CHSPAWNER_STATE_DIR", "/var/lib/jupyterhub")
HUB_DB = SITE("CHSPAWNER_HUB_DB", "postgresql+psycopg://jupyterhub@/jupyterhub")
SESSIONS_DB = SITE("CHSPAWNER_SESSIONS_DB", "postgresql+psycopg://chspawner@/sessions")
VENV = SITE("CHSPAWNER_VENV", "/opt/chspawner/venv")   # the same path on every node
PARTITIONS = SITE("CHSPAWNER_PARTITIONS", "interactive").split(",")
PROXY_TOKEN = SITE("CONFIGPROXY_AUTH_TOKEN") or secrets.token_hex(32)
HUB_PORT = int(SITE("CHSPAWNER_HUB_PORT", "8081"))           # the hub's API, for the nodes
PROXY_API_PORT = int(SITE("CHSPAWNER_PROXY_API_PORT", "8001"))   # on 127.0.0.1
SESSIONS_PORT = int(SITE("CHSPAWNER_SESSIONS_PORT", "8090"))     # on 127.0.0.1
# The Slurm side of a spawn: each user charges an account of their own
# associations (needs slurmdbd; "no": Slurm's default account), picks one of
# the QOS offered; every job may need a reservation or node features.
ACCOUNTS_FROM_SLURM = SITE("CHSPAWNER_ACCOUNTS_FROM_SLURM", "yes") == "yes"
QOS = [q for q in SITE("CHSPAWNER_QOS", "normal,long").split(",") if q]
RESERVATION = SITE("CHSPAWNER_RESERVATION", "")
CONSTRAINT = SITE("CHSPAWNER_CONSTRAINT", "")

c = get_config()  # noqa: F821 (JupyterHub defines it)

# ------------------------------------------------------------------ hub ---
# The hub listens where compute nodes can reach it: a server on a node
# calls back to the hub's API (at start, and for every login). With the
# default (127.0.0.1) servers on nodes never become ready.
c.JupyterHub.hub_bind_url = f"http://{HUB_IP}:{HUB_PORT}"
c.JupyterHub.hub_connect_ip = HUB_IP
c.JupyterHub.db_url = HUB_DB
c.JupyterHub.cookie_secret_file = f"{STATE}/jupyterhub_cookie_secret"
c.JupyterHub.bind_url = PUBLIC_URL
c.JupyterHub.cleanup_servers = False    # a hub restart leaves users' servers running

# ---------------------------------------------------- the session proxy ---
# chspawner-proxy in configurable-http-proxy's place: it holds a lost
# server's route while the session manager brings it back.
c.JupyterHub.proxy_class = "jupyterhub.proxy.ConfigurableHTTPProxy"
c.ConfigurableHTTPProxy.command = [f"{VENV}/bin/chspawner-proxy"]
c.ConfigurableHTTPProxy.auth_token = PROXY_TOKEN
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{PROXY_API_PORT}"
c.ConfigurableHTTPProxy.should_start = True

# ---------------------------------------------------------- the spawner ---
c.JupyterHub.spawner_class = "slurmchspawner"
# The venv's own server (the job's PATH is the hub's, which need not have it).
c.Spawner.cmd = [f"{VENV}/bin/jupyterhub-singleuser"]
c.ChSpawner.site_storage = STORE
c.ChSpawner.images = [
    {"name": "python", "description": "Debian bookworm, Python 3.11 and ipykernel"},
    {"name": "jupyter", "description": "JupyterLab inside the image (server mode)"},
]
c.ChSpawner.modes = ["kernels", "server"]
c.SlurmChSpawner.partitions = PARTITIONS
c.SlurmChSpawner.max_cpus = 16
c.SlurmChSpawner.max_mem_gb = 64
c.SlurmChSpawner.max_hours = 12
c.SlurmChSpawner.kernel_jobs = True     # each kernel a job of its own, outliving the server's
c.SlurmChSpawner.kernel_jobs_elsewhere = True  # ... on another node than the server's
c.SlurmChSpawner.job_log_dir = "{home}/.local/state/chspawner/logs"
c.SlurmChSpawner.accounts_from_slurm = ACCOUNTS_FROM_SLURM
c.SlurmChSpawner.qos = QOS
c.SlurmChSpawner.reservation = RESERVATION
c.SlurmChSpawner.constraint = CONSTRAINT
# The site's set-up before every server starts, in its job (the admin's
# lines, never a user's; a failing line doesn't stop the job).
c.SlurmChSpawner.job_setup = ["[ -r /etc/profile.d/site.sh ] && . /etc/profile.d/site.sh"]
# Sessions past the time limit: the form offers "keep my session" (a
# successor job queued move_lead seconds before the end takes over; the
# route switches once its server answers). JupyterLab warns at these minutes.
c.SlurmChSpawner.walltime_move = "offer"
c.SlurmChSpawner.move_lead = 600
c.SlurmChSpawner.walltime_warnings = [15, 5]
# Kernels' variables across moves: each Python kernel records its session;
# a kernel job is moved to a new job 10 minutes before its time limit (its
# session saved and restored there), and one lost gets its latest snapshot
# (taken every 30 minutes while it works) back. Snapshots (at most 2 GB of
# variables each) stay in the user's home.
c.ChSpawner.kernel_session_state = True
c.ChSpawner.kernel_snapshot_limit = 2 * 1000**3
c.ChSpawner.kernel_autosave_interval = 1800
c.SlurmChSpawner.kernel_move_lead = 600
c.Spawner.start_timeout = 600           # a job may wait in the queue
c.Spawner.http_timeout = 120
# JupyterHub's own poll stays at its default or longer: the session
# manager notices a loss first, which is how it tells a loss from a stop.
c.Spawner.poll_interval = 30

# ------------------------------------------------- the session manager ---
c.JupyterHub.services = [
    {
        "name": "chspawner-sessions",
        "url": f"http://127.0.0.1:{SESSIONS_PORT}",
        "command": [f"{VENV}/bin/chspawner-session-manager",
                    f"--db-url={SESSIONS_DB}",
                    f"--proxy-api-url={c.ConfigurableHTTPProxy.api_url}"],
        "environment": {"CONFIGPROXY_AUTH_TOKEN": PROXY_TOKEN},
    },
    {
        "name": "idle-culler",
        "command": [f"{VENV}/bin/python", "-m", "jupyterhub_idle_culler", "--timeout=3600"],
    },
]
c.JupyterHub.load_roles = [
    # The least the manager needs: list users' servers with their options,
    # read one, stop and start it. Its checks of servers carry no credential.
    {"name": "chspawner-sessions", "services": ["chspawner-sessions"],
     "scopes": ["list:users", "servers"]},
    {"name": "idle-culler", "services": ["idle-culler"],
     "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]},
]
