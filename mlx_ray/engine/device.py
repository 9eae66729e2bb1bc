"""What the device offers the memory plan: its memory, Metal's working set, and where those figures came from.

:func:`local` asks MLX (Metal's ``max_recommended_working_set_size`` on a
Mac, total RAM elsewhere). A *profile* stands in for a device that is not
here: ``mlx-ray plan --device m4-pro-48gb`` plans for the Mac from any
machine, and the tests start an engine on the Mac's figures with
``MLX_RAY_DEVICE_PROFILE``. A profile changes only the numbers the plan reads;
nothing runs on the device it names, and the engine logs that it uses one.

The Apple figures below are arithmetic, not measurements: unified memory as
sold, and Metal's recommended working set as macOS reports it on machines of
that size (about 75% of RAM from 36 GB up, about two thirds below). Check
them on the Mac with ``mlx-ray doctor``, which prints what Metal reports.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

GiB = 1 << 30
PROFILE_ENV = "MLX_RAY_DEVICE_PROFILE"


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int  # RAM (unified memory on a Mac)
    working_set_bytes: int  # the most the plan may use: Metal's recommended working set, else RAM less the OS share
    metal: bool
    source: str  # "metal", "ram" or "profile"
    bandwidth_gbs: float = 0.0  # memory bandwidth (vendor figure; informational)

    def as_dict(self) -> dict:
        return asdict(self)


def _apple(name: str, gb: int, bandwidth: float, share: float = 0.75) -> Device:
    return Device(name, gb * GiB, int(gb * share) * GiB, True, "profile", bandwidth)


PROFILES: dict[str, Device] = {d.name: d for d in (
    _apple("m4-pro-48gb", 48, 273.0),  # the user's Mac Mini (host waterdeep)
    _apple("m4-pro-24gb", 24, 273.0, share=2 / 3),
    _apple("m4-max-64gb", 64, 546.0),
    _apple("m4-max-128gb", 128, 546.0),
    _apple("m3-ultra-192gb", 192, 819.0),
)}

OS_SHARE_WITHOUT_METAL = 0.25  # a CPU host keeps a quarter of RAM for everything else (as Metal's 75%)


def local() -> Device:
    """This machine as MLX sees it."""
    import mlx.core as mx

    info: dict = {}
    get = getattr(mx, "device_info", None) or getattr(getattr(mx, "metal", None), "device_info", None)
    try:
        info = dict(get()) if get is not None else {}
    except Exception:  # noqa: BLE001 - an MLX without device_info: fall back to RAM
        info = {}
    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    wss = int(info.get("max_recommended_working_set_size") or 0)
    mem = int(info.get("memory_size") or 0)
    if not mem:
        import psutil

        mem = int(psutil.virtual_memory().total)
    name = str(info.get("device_name") or info.get("architecture") or ("metal" if metal else "cpu"))
    if metal and wss:
        return Device(name, mem, wss, True, "metal")
    return Device(name, mem, int(mem * (1 - OS_SHARE_WITHOUT_METAL)), False, "ram")


def resolve(name: str | None = None) -> Device:
    """A profile by name, ``local`` (or None: ``$MLX_RAY_DEVICE_PROFILE`` when set, else this machine)."""
    from ..errors import BadRequest

    name = name if name is not None else os.environ.get(PROFILE_ENV)
    if not name or name == "local":
        return local()
    dev = PROFILES.get(name)
    if dev is None:
        raise BadRequest(f"unknown device profile {name!r}; choose one of: local, {', '.join(PROFILES)}",
                         param="device")
    return dev
