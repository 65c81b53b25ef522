"""What a worker machine is (inventory) and how busy it is (samples), read without touching CUDA.

GPUs are read through NVML (`pynvml`, from nvidia-ml-py), never through `torch.cuda`: the worker's
main process must not start CUDA, so that each job's fresh process can pick its own GPUs with
CUDA_VISIBLE_DEVICES. A machine without the NVIDIA driver reports `"gpus": []` and its CPUs and
memory. A query one GPU does not support (utilisation on some boards, temperature in some VMs)
leaves that field `None` rather than losing the GPU.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The ML stack, the trackers runs may report to, and the runtimes jobs may check exports in (None where a package is
# missing; the control plane places vLLM exports on workers that report vllm).
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "tensorboard", "mlflow-skinny", "wandb", "vllm")
MEMINFO = Path("/proc/meminfo")

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"module": None, "error": None}


def inventory() -> dict[str, Any]:
    """The machine: host, Python and ML package versions, driver versions and every GPU."""
    memory = host_memory()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_total": memory.get("total"),
        **{name: package_version(name) for name in PACKAGES},
        "driver_version": None,
        "cuda_driver_version": None,
        "gpus": [],
    }
    nvml = _nvml()
    if nvml is None:
        info["nvml_error"] = _nvml_state["error"]
        return info
    info["driver_version"] = _text(_query(nvml.nvmlSystemGetDriverVersion))
    info["cuda_driver_version"] = cuda_version_text(_query(nvml.nvmlSystemGetCudaDriverVersion))
    for index, handle in _devices(nvml):
        info["gpus"].append({
            "index": index,
            "name": _text(_query(nvml.nvmlDeviceGetName, handle)),
            "uuid": _text(_query(nvml.nvmlDeviceGetUUID, handle)),
            **_live(nvml, handle),
        })
    return info


def sample() -> dict[str, Any]:
    """The live part: per GPU its memory, utilisation and temperature; the host's available memory."""
    memory = host_memory()
    result: dict[str, Any] = {"memory_available": memory.get("available"), "memory_total": memory.get("total"), "gpus": [],
                              "artifacts": artifact_store()}
    nvml = _nvml()
    if nvml is not None:
        result["gpus"] = [{"index": index, **_live(nvml, handle)} for index, handle in _devices(nvml)]
    return result


def artifact_store() -> dict[str, Any]:
    """How this worker has its artifacts: {"mode": "local"} (the store shared with the web server) or
    {"mode": "remote", "cache_used", "cache_max"} (its own folder; the input cache's bytes and bound)."""
    from workers.config import ConfigError, worker_cache_bytes, worker_cache_dir, worker_store_mode

    try:
        mode = worker_store_mode()
        if mode == "local":
            return {"mode": mode}
        from workers.runtime.remote import InputCache

        cache = InputCache(worker_cache_dir(), worker_cache_bytes())
        return {"mode": mode, "cache_used": cache.used_bytes(), "cache_max": cache.max_bytes}
    except (ConfigError, OSError) as exc:
        return {"mode": "unknown", "error": str(exc)}


def gpu_count() -> int:
    nvml = _nvml()
    return 0 if nvml is None else len(_devices(nvml))


def package_version(name: str) -> str | None:
    """The installed version from the package's metadata (importing torch only to read it would be slow)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def host_memory() -> dict[str, int]:
    """Total and available host memory in bytes: /proc/meminfo where there is one, else sysconf."""
    try:
        fields = {}
        for line in MEMINFO.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        if "MemTotal" in fields:
            return {"total": fields["MemTotal"], "available": fields.get("MemAvailable", fields.get("MemFree", 0))}
    except OSError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return {"total": page * os.sysconf("SC_PHYS_PAGES"), "available": page * os.sysconf("SC_AVPHYS_PAGES")}
    except (ValueError, OSError, AttributeError):
        return {}


def cuda_version_text(value: Any) -> str | None:
    """NVML's CUDA driver version number (12040) as CUDA writes it (12.4)."""
    if not isinstance(value, int) or value <= 0:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def _nvml() -> Any:
    """The initialised pynvml module, or None (and the reason kept) where there is no NVML."""
    with _nvml_lock:
        if _nvml_state["module"] is not None or _nvml_state["error"] is not None:
            return _nvml_state["module"]
        try:
            import pynvml
        except ImportError:
            _nvml_state["error"] = "nvidia-ml-py is not installed"
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:  # no driver, no library: a CPU machine
            _nvml_state["error"] = f"NVML unavailable: {exc}"
            return None
        _nvml_state["module"] = pynvml
        return pynvml


def _devices(nvml: Any) -> list[tuple[int, Any]]:
    count = _query(nvml.nvmlDeviceGetCount) or 0
    handles = []
    for index in range(count):
        handle = _query(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is not None:  # e.g. a GPU that fell off the bus: the others still count
            handles.append((index, handle))
    return handles


def _live(nvml: Any, handle: Any) -> dict[str, Any]:
    memory = _query(nvml.nvmlDeviceGetMemoryInfo, handle)
    rates = _query(nvml.nvmlDeviceGetUtilizationRates, handle)
    return {
        "memory_total": int(memory.total) if memory is not None else None,
        "memory_free": int(memory.free) if memory is not None else None,
        "memory_used": int(memory.used) if memory is not None else None,
        "utilization": int(rates.gpu) if rates is not None else None,
        "temperature": _query(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
    }


def _query(function: Callable[..., Any], *args: Any) -> Any:
    """One NVML query, or None where this GPU or driver does not support it."""
    import pynvml

    try:
        return function(*args)
    except pynvml.NVMLError as exc:
        log.debug("%s%s: %s", function.__name__, args, exc)
        return None


def _text(value: Any) -> str | None:
    """Older pynvml releases return bytes, newer ones str."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None
