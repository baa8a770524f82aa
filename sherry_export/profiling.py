"""onnxruntime's profiler output, read the same way by every benchmark, and the machine it ran on."""

from __future__ import annotations

import json
import os
import platform


def read_profile(profile_path: str) -> list[dict]:
    """The events of an onnxruntime profile file, which is deleted once read (they pile up otherwise)."""
    with open(profile_path) as f:
        events = json.load(f)
    os.unlink(profile_path)
    return events


def kernel_events(events: list[dict]) -> list[dict]:
    """The per-node kernel events of a profile (``args.op_name`` is the op type, ``dur`` the µs)."""
    return [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime as ort

    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {ort.__version__}"
