"""Recorded Triton launches, replayed: a call's launches are recorded per input layout
(:func:`layout_key`, :func:`record`) and repeated on later calls of that layout (:func:`replay`)
through the compiled kernel's C launcher. The GPU idles until the host issues the first launch,
and Triton's JIT and Python launch paths and the strided views were most of that host time.

Knows nothing of the kernels: a :class:`Launch` (built by ``triton_forward.forward_into`` and
``triton_block_sparse``) holds the compiled kernel, its grid, its pointer arguments' offsets from
the call's base tensors, which of them are TMA descriptors, and the remaining arguments. Imported
only with the Triton kernels, so CPU installs need no Triton.

The host work of a launch through Triton's JIT (binding and specializing every argument,
building descriptors, the cache lookup) and of the strided views is done once per input layout.
Each launch then goes straight to the compiled kernel's C launcher with its final arguments,
built once per set of base pointers (and stream): Triton's Python launch path (launch metadata,
scratch closures, one cuTensorMapEncode per TMA descriptor) measured several times the C
launcher's host time per launch (benchmarks/RESULTS.md, "Where the host time goes"), and the
GPU waits for the first. Checked against Triton 3.6's launcher (pointers as ints, host
descriptors read through .base.data_ptr(), .shape, .strides, .padding; the C launcher's leading
arguments); other versions take the plain path every call, as does DILATED_OPS_TRITON_REPLAY=0.
With a launch hook set (a profiler such as proton), replays go through Triton's launch path,
which calls it.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import triton

REPLAY = (
    os.environ.get("DILATED_OPS_TRITON_REPLAY", "1") != "0"
    and tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)
)
_MAX_LAYOUTS = 256
_MAX_POINTER_SETS = 16  # per layout: the argument tuples of the last few calls' base pointers
_LAUNCHES: Dict[tuple, "Recorded"] = {}
_RECORD_LOCK = threading.Lock()  # lookups need none: a dict read is atomic


class Launch(NamedTuple):
    """One recorded launch: the compiled kernel, its grid, the byte offsets of its leading
    pointer arguments from the call's base tensors (one per base, in order), per pointer argument
    the TMA descriptor's (shape, strides, block) or None for a plain pointer (``tma`` None: no
    descriptors), and the remaining arguments (constexprs last, as Triton passes them)."""

    kernel: object
    grid: Tuple[int, int, int]
    offsets: Tuple[int, ...]
    tma: Optional[tuple]
    rest: tuple


class Direct(NamedTuple):
    """A compiled kernel's C launcher and what it takes besides the stream and the kernel's own
    arguments; ``expand`` turns those into the C launcher's (host descriptors into CUtensorMaps)."""

    launch: Callable
    expand: Callable
    head: tuple  # (grid x, y, z)
    tail: tuple  # function .. launch exit hook: the C launcher's arguments after the stream


class Recorded:
    """The launches of one layout, their direct launchers (None where Triton's launcher is not
    the one this module knows) and the C launchers' argument tuples per (stream, base pointers)."""

    __slots__ = ("launches", "direct", "ready")

    def __init__(self, launches: Tuple[Launch, ...]):
        self.launches = launches
        direct = tuple(_direct(x.kernel, x.grid) for x in launches)
        self.direct = direct if all(d is not None for d in direct) else None
        self.ready: Dict[tuple, tuple] = {}


def _direct(kernel, grid) -> Optional[Direct]:
    """The C launcher behind ``kernel[grid](...)`` (Triton 3.6's ``CudaLauncher``), or None."""
    try:
        from triton.backends.nvidia import driver as nvidia

        launcher = kernel.run
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None  # scratch is allocated per launch
        expand = nvidia.wrap_handle_tensordesc(_identity, kernel.src.signature,
                                               getattr(kernel.metadata, "tensordesc_meta", None))
        c_launch = launcher.launch
        if expand is not _identity:  # Triton wrapped its C launcher to expand the descriptors
            cells = dict(zip(c_launch.__code__.co_freevars, (c.cell_contents for c in c_launch.__closure__)))
            c_launch = cells["launcher"]
        tail = (kernel.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                kernel.packed_metadata, None, None, None)
        return Direct(c_launch, expand, tuple(grid), tail)
    except (AttributeError, KeyError, TypeError, ImportError):
        return None


def _identity(*args):
    return args


class _Address:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


class _Descriptor:
    """A host TMA descriptor as Triton's launcher reads it, without TensorDescriptor's checks
    (made on the recorded launch)."""

    __slots__ = ("base", "shape", "strides", "block_shape")
    padding = "zero"

    def __init__(self, ptr: int, shape, strides, block_shape):
        self.base = _Address(ptr)
        self.shape, self.strides, self.block_shape = shape, strides, block_shape


def layout_key(tensors, *config) -> tuple:
    """What fixes the launches of a call over the base tensors ``tensors``: their shapes,
    strides, dtypes, the 16-byte alignment of their base pointers (Triton specializes on it), the
    device and ``config``, the rest (the kernel and its settings, then the call's own)."""
    return (
        tuple((t.shape, t.stride(), t.dtype, t.data_ptr() % 16) for t in tensors), tensors[0].device.index, *config,
    )


def recorded(key: tuple) -> Optional[Recorded]:
    """The launches recorded for ``key``; None if none are, or replay is off."""
    return _LAUNCHES.get(key) if REPLAY else None


def record(key: tuple, launches) -> None:
    """Keep the launches of one call (``triton_forward.forward_into``'s results) for ``key``;
    the oldest layout goes once ``_MAX_LAYOUTS`` are kept."""
    launches = tuple(x for x in launches if x is not None)  # None: an empty piece, no launch
    if not REPLAY or any(x.kernel is None for x in launches):
        return
    rec = Recorded(launches)
    with _RECORD_LOCK:
        if len(_LAUNCHES) >= _MAX_LAYOUTS:
            _LAUNCHES.pop(next(iter(_LAUNCHES)))
        _LAUNCHES[key] = rec


def clear_recorded() -> None:
    with _RECORD_LOCK:
        _LAUNCHES.clear()


def num_recorded() -> int:
    return len(_LAUNCHES)


def _kernel_args(launch: Launch, ptrs) -> list:
    """``launch``'s kernel arguments for base pointers ``ptrs``."""
    p = [base + off for base, off in zip(ptrs, launch.offsets)]
    if launch.tma is not None:
        for i, spec in enumerate(launch.tma):
            if spec is not None:
                p[i] = _Descriptor(p[i], *spec)
    return [*p, *launch.rest]


def _hook_set(hook) -> bool:
    # Triton 3.6 keeps each launch hook as a HookChain (its ``calls`` empty when none is added);
    # a plain callable assigned in its place counts as set.
    calls = getattr(hook, "calls", None)
    return bool(calls) if isinstance(calls, list) else hook is not None


def _hooked() -> bool:
    rt = triton.knobs.runtime
    return _hook_set(rt.launch_enter_hook) or _hook_set(rt.launch_exit_hook)


def replay(rec: Recorded, *tensors) -> None:
    """Repeat the launches of ``rec`` (recorded for base tensors of this layout) on the base
    tensors ``tensors``, given in the order of the recording."""
    ptrs = tuple(t.data_ptr() for t in tensors)
    stream = triton.runtime.driver.active.get_current_stream(tensors[0].device.index)
    if rec.direct is None or _hooked():
        for launch in rec.launches:
            launch.kernel[launch.grid](*_kernel_args(launch, ptrs), stream=stream)
        return
    ready = rec.ready.get((stream, ptrs))
    if ready is None:
        # A descriptor encodes its base pointer, shape and strides; the layout fixes the latter
        # two, so the arguments built here hold for any later call with these pointers.
        ready = tuple(
            (d.launch, d.expand(*d.head, stream, *d.tail, *_kernel_args(launch, ptrs)))
            for launch, d in zip(rec.launches, rec.direct)
        )
        if len(rec.ready) >= _MAX_POINTER_SETS:
            rec.ready.pop(next(iter(rec.ready)), None)
        rec.ready[(stream, ptrs)] = ready
    for c_launch, args in ready:
        c_launch(*args)
