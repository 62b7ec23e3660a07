"""sparseopt's compiled CPU kernels: built from C source on the machine that runs them, cached, optional.

Nothing here is needed to train or to run a model: where the kernels cannot be built, the deployment
code uses torch's kernels. ``sparseopt kernels`` prints which path is active and why.
"""

from .build import Backend, backend, cache_root, cpu_info, load

__all__ = ["Backend", "backend", "cache_root", "cpu_info", "load"]
