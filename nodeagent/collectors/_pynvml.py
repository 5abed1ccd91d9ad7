"""pynvml (nvidia-ml-py), imported on first use rather than at start: the module is large (about
3 MB of the agent's memory once imported) and a node without the NVIDIA driver never needs it.
The GPU modules take `pynvml` from here; `driver_library_present` tells, without importing it,
whether there is a driver library for NVML to load.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import TYPE_CHECKING

# What pynvml itself loads on Linux (its _LoadNvmlLibrary); other platforms have their own.
_LINUX_LIBRARY = "libnvidia-ml.so.1"


def _lazy_module(name: str) -> types.ModuleType:
    """The module, loaded by the first access to one of its attributes (the standard library's
    LazyLoader); the module itself when something imported it already."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return importlib.import_module(name)  # raises the usual ImportError
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import pynvml as pynvml
else:
    pynvml = _lazy_module("pynvml")


def driver_library_present() -> bool:
    """Whether NVML's library can be loaded (the NVIDIA driver is installed), asked of the
    dynamic loader without importing pynvml. True when pynvml is already loaded (nvmlInit then
    answers at no extra cost) and on platforms other than Linux (pynvml knows where to look)."""
    if type(pynvml) is types.ModuleType or not sys.platform.startswith("linux"):
        # An exact ModuleType: loaded (a lazy module not yet loaded is of a subclass).
        return True
    import ctypes

    try:
        ctypes.CDLL(_LINUX_LIBRARY)
    except OSError:
        return False
    return True
