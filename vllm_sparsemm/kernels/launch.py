"""Launches of the package's Triton kernels straight from the kernels built
for them, past Triton's own launch path.

Every layer of a step launches the K/V write and the decode kernels (and
some layers the selection's), and a step that holds prompts is bound by the
host: Triton's launch path (option strings, launch metadata, hook chains, a
check of the kernel's globals) costs the host more per call than the binding
of the arguments does. ``Launcher`` binds the arguments with Triton's own
binder, so Triton's specialization (dtypes, alignments, constants, options)
stays the key, and launches the kernel Triton returned for that key before;
a new key takes Triton's path, which builds or finds the kernel. Under
Triton's interpreter, without the Triton internals it uses, or while
Triton's launch hooks or pre-run hooks are set (a profiler's), every launch
is Triton's own.
"""

from __future__ import annotations

from vllm.logger import init_logger

logger = init_logger("vllm.sparsemm.kernels")


class Launcher:
    """``Launcher(kernel)(grid, *args, **kwargs)`` launches as
    ``kernel[grid](*args, **kwargs)`` does."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._built: dict = {}  # Triton's key -> the kernel it returned
        self._direct: bool | None = None  # decided at the first launch
        self.direct_launches = 0  # for the tests

    def __call__(self, grid: tuple, *args, **kwargs) -> None:
        if self._direct is None:
            self._direct = _can_launch_directly(self.kernel)
        if not self._direct or _hooked(self.kernel):
            self.kernel[grid](*args, **kwargs)
            return
        device = _current_device()
        binder = self.kernel.device_caches[device][4]
        bound, specialization, options = binder(*args, **kwargs)
        key = (device, *specialization, *options.items())
        try:
            built = self._built.get(key)
        except TypeError:  # an unhashable constant: no key of ours
            key, built = None, None
        if built is None:
            built = self.kernel[grid](*args, **kwargs)
            if key is not None and hasattr(built, "packed_metadata"):
                self._built[key] = built
            return
        grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
        built.run(grid_x, grid_y, grid_z, _current_stream(device),
                  built.function, built.packed_metadata, None, None, None,
                  *bound.values())
        self.direct_launches += 1


def _can_launch_directly(kernel) -> bool:
    """Whether this Triton has the internals ``Launcher`` uses, on a GPU."""
    global _current_device, _current_stream, _runtime
    try:
        from triton import knobs
        from triton.runtime import driver
        if knobs.runtime.interpret or not hasattr(kernel, "device_caches"):
            return False
        _runtime = knobs.runtime
        _current_device = driver.active.get_current_device
        _current_stream = driver.active.get_current_stream
        binder = kernel.device_caches[_current_device()][4]
        hooks = (_runtime.launch_enter_hook, _runtime.launch_exit_hook)
        usable = (callable(binder) and hasattr(kernel, "pre_run_hooks")
                  and all(hasattr(h, "calls") for h in hooks))
    except Exception as error:  # any other Triton, or no GPU
        logger.debug("Triton's own launch path for %s: %s",
                     getattr(kernel, "__name__", kernel), error)
        return False
    return usable


def _hooked(kernel) -> bool:
    """Whether a launch must run Triton's hooks (a profiler's)."""
    return bool(_runtime.launch_enter_hook.calls
                or _runtime.launch_exit_hook.calls or kernel.pre_run_hooks)


# Triton's runtime knobs and driver functions, set at the first launch
_runtime = _current_device = _current_stream = None
