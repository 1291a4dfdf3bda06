"""The spawner of bench/scale.py: a real Slurm job per server, a stand-in
for the server itself (bench/standin.py).

Each server is a real ``sleep`` job on the test cluster, submitted with the
project's one sbatch builder and followed, from start to stop, through the
same shared job watch as SlurmChSpawner's (one squeue per interval for the
whole hub, however many jobs). What would run in the job, a Jupyter server,
is a stand-in of bench/standin.py on the hub's host: the hub, the session
proxy and the session manager see a server that answers, at a URL of its
own, and that can be lost.
"""
from __future__ import annotations

import aiohttp
from jupyterhub.spawner import Spawner
from traitlets import Dict, Float, Unicode

from chspawner.slurm import JobState, SlurmClient, SlurmError, sbatch_argv, shared_watch
from chspawner.spawners.slurm import PATH


class StandInSpawner(Spawner):
    control_url = Unicode(help="bench/standin.py's control API.").tag(config=True)
    slurm_env = Dict(help="Slurm's client environment (SLURM_CONF).").tag(config=True)
    poll_every = Float(1.0, help="The shared watch's interval (as "
                       "SlurmChSpawner.slurm_poll_interval).").tag(config=True)

    job_id = ""

    def _key(self) -> str:
        return f"{self.user.name}-{self.name or 'default'}"

    def _client(self) -> SlurmClient:
        return SlurmClient(env={"PATH": PATH, **self.slurm_env})

    async def _state(self) -> JobState:
        """The job's state through the hub's shared watch."""
        watch = shared_watch({"PATH": PATH, **self.slurm_env}, interval=self.poll_every,
                             logger=self.log)
        return (await watch.job(self.job_id, max_age=self.poll_every)).state

    async def start(self) -> tuple[str, int]:
        argv = sbatch_argv(["sleep", "infinity"], job_name=f"standin-{self._key()}",
                           output="/dev/null", chdir="/tmp")
        self.job_id = await self._client().submit(argv)
        while (state := await self._state()) is JobState.PENDING:
            pass  # (each call waits for the watch's next round)
        if state is not JobState.RUNNING:
            raise RuntimeError(f"job {self.job_id} ended before it ran")
        async with aiohttp.ClientSession(trust_env=False) as http:
            async with http.post(f"{self.control_url}/servers/{self._key()}") as r:
                r.raise_for_status()
                port = (await r.json())["port"]
        return "127.0.0.1", port

    async def poll(self) -> int | None:
        if not self.job_id:
            return 0
        try:
            state = await self._state()
        except SlurmError:
            return None
        return None if state is not JobState.GONE else 1

    async def stop(self, now: bool = False) -> None:
        async with aiohttp.ClientSession(trust_env=False) as http:
            async with http.delete(f"{self.control_url}/servers/{self._key()}"):
                pass
        if self.job_id:
            try:
                await self._client().cancel(self.job_id)
            except SlurmError as e:
                self.log.warning("scancel %s: %s", self.job_id, e)
        self.clear_state()

    def get_state(self) -> dict:
        state = super().get_state()
        if self.job_id:
            state["job_id"] = self.job_id
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.job_id = state.get("job_id", "")

    def clear_state(self) -> None:
        super().clear_state()
        self.job_id = ""
