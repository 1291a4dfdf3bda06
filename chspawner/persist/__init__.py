"""Kernels that outlive their Jupyter server (persistence level L2): the
plugins a Jupyter server loads (kernel manager, websocket connection,
session manager), the per-kernel keeper process, the kernel records and the
replay of what clients missed."""
