"""Dry-run SM splits through the CUDA driver API (ctypes, ``libcuda.so.1``).

``cuDevSmResourceSplitByCount`` (CUDA 12.4+) tells how many SMs a green context of ``n`` SMs
gets, without creating one. PyTorch before 2.15 splits the same way and does not expose the
result, so this is how the granted count and the device's real grid are read there.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

from nova.gpu.sm_plan import SMGrid

_CU_DEV_RESOURCE_TYPE_SM = 1
_RESOURCE_BYTES = 512  # CUdevResource is 144-152 bytes in CUDA 12.4-13.x; room to spare
_SM_COUNT_OFFSET = 96  # after ``type`` (4 bytes) and ``_internal_padding[92]``

_Resource = ctypes.c_ubyte * _RESOURCE_BYTES


class GrantProbe(Protocol):
    """What the green-context backend asks a probe: the SMs a context of ``min_count`` gets."""

    def granted(self, min_count: int) -> int | None: ...


class DriverProbe:
    """``GrantProbe`` through the driver; every answer is ``None`` when unavailable."""

    def __init__(self, device_index: int) -> None:
        self._lib: ctypes.CDLL | None = None
        self._device = ctypes.c_int(0)
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuInit(0)
            if lib.cuDeviceGet(ctypes.byref(self._device), device_index) != 0:
                return
            # Looked up here so that a driver without them counts as unavailable.
            self._get_resource = lib.cuDeviceGetDevResource
            self._split = lib.cuDevSmResourceSplitByCount
            self._lib = lib
        except (OSError, AttributeError):
            self._lib = None

    @property
    def available(self) -> bool:
        return self._lib is not None

    @staticmethod
    def _sm_count(buf: ctypes.Array[ctypes.c_ubyte]) -> int:
        return int(ctypes.c_uint.from_buffer(buf, _SM_COUNT_OFFSET).value)

    def _device_resource(self) -> ctypes.Array[ctypes.c_ubyte] | None:
        if self._lib is None:
            return None
        full = _Resource()
        rc = self._get_resource(self._device, ctypes.byref(full), _CU_DEV_RESOURCE_TYPE_SM)
        return full if rc == 0 else None

    def device_sms(self) -> int | None:
        full = self._device_resource()
        return None if full is None else self._sm_count(full)

    def granted(self, min_count: int) -> int | None:
        full = self._device_resource()
        if full is None:
            return None
        result = _Resource()
        remaining = _Resource()
        nb = ctypes.c_uint(1)
        rc = self._split(
            ctypes.byref(result),
            ctypes.byref(nb),
            ctypes.byref(full),
            ctypes.byref(remaining),
            ctypes.c_uint(0),
            ctypes.c_uint(min_count),
        )
        if rc != 0 or nb.value != 1:
            return None
        return self._sm_count(result)

    def grid(self, fallback: SMGrid) -> SMGrid:
        """The device's real minimum partition and step, probed; ``fallback`` if unavailable."""
        total = self.device_sms()
        smallest = self.granted(1)
        if not total or not smallest:
            return fallback
        nxt = self.granted(smallest + 1)
        step = (nxt - smallest) if nxt and nxt > smallest else fallback.granularity
        return SMGrid(total, step, smallest)
