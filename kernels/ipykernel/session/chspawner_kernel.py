"""ipykernel, started with chspawner's session recorder loaded.

The provisioner runs this file in place of ``-m ipykernel_launcher`` (the
image's own Python and ipykernel; the file and its neighbours are copied
into the kernel's staging directory, which the container sees). It puts
the kernel's directory first on ``sys.path`` as ``-m`` would, this
directory last (so the image's own modules, a cloudpickle of its own
included, come first), and asks ipykernel to load the
``chspawner_session`` extension (see that module).
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.getcwd()
sys.path.append(here)
sys.argv.append("--IPKernelApp.extra_extensions=chspawner_session")

from ipykernel import kernelapp  # noqa: E402  (after the path is set)

kernelapp.launch_new_instance()
