"""How much more memory a CPU run may take: 90 % of what the machine has available, bounded
by the memory limit of the container it runs in (cgroup v2 or v1).

The kernel's OOM killer ends a process that goes over either without a message, so a CPU run
is checked against the smaller of the two before it loads weights. Page cache counts against
a cgroup's usage but is reclaimed first, so its inactive file pages count as available.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
UNLIMITED = 1 << 60
"""cgroup v1 reports no limit as a number near 2**63."""
USABLE = 0.9
"""The share of MemAvailable (or a cgroup's headroom) a run plans to use: the estimate counts
the page cache the kernel can reclaim, and the OOM killer acts before all of it is gone."""
BUDGET_ENV = "KUBETUNE_HOST_MEMORY_GIB"
"""Caps the memory a CPU run plans for (to leave room for other programs)."""


@dataclass(frozen=True)
class HostMemory:
    """Memory this process may still take, in GiB, and what bounds it."""

    available_gib: float
    source: str
    """'this machine', 'the container's memory limit' or BUDGET_ENV."""


def meminfo_available(text: str) -> int | None:
    """MemAvailable of /proc/meminfo, in bytes."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "MemAvailable":
            fields = value.split()
            if fields and fields[0].isdigit():
                return int(fields[0]) * 1024
    return None


def _number(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def _inactive_file(stat: str | None) -> int:
    """Reclaimable page cache of a cgroup's memory.stat (v2 `inactive_file`, v1
    `total_inactive_file`)."""
    values = dict(line.split()[:2] for line in (stat or "").splitlines() if len(line.split()) >= 2)
    for key in ("inactive_file", "total_inactive_file"):
        if values.get(key, "").isdigit():
            return int(values[key])
    return 0


def cgroup_headroom(limit: str | None, usage: str | None, stat: str | None) -> int | None:
    """Bytes a cgroup may still grow: limit - (usage - inactive page cache); None without a
    limit ('max', absent, or v1's near-2**63)."""
    cap, used = _number(limit), _number(usage)
    if cap is None or used is None or cap >= UNLIMITED:
        return None
    return max(cap - max(used - _inactive_file(stat), 0), 0)


def cgroup_dirs(self_cgroup: str, root: Path) -> list[tuple[Path, str]]:
    """(directory, version) of this process's memory cgroups from /proc/self/cgroup, the
    namespaced root first (inside a container the process sees its own cgroup at the root)."""
    found: list[tuple[Path, str]] = []
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.lstrip("/")
        if controllers == "":
            found += [(root, "v2"), (root / relative, "v2")]
        elif "memory" in controllers.split(","):
            base = root / "memory"
            found += [(base, "v1"), (base / relative, "v1")]
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def read_host_memory(
    proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> HostMemory | None:
    """The memory this process may still take (None when /proc/meminfo is unreadable)."""
    available = meminfo_available(_read(proc / "meminfo") or "")
    if available is None:
        return None
    best = HostMemory(USABLE * available / GIB, "this machine")
    names = {
        "v2": ("memory.max", "memory.current"),
        "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes"),
    }
    for directory, version in cgroup_dirs(_read(proc / "self" / "cgroup") or "", cgroup_root):
        limit_name, usage_name = names[version]
        headroom = cgroup_headroom(
            _read(directory / limit_name),
            _read(directory / usage_name),
            _read(directory / "memory.stat"),
        )
        if headroom is not None and USABLE * headroom / GIB < best.available_gib:
            best = HostMemory(USABLE * headroom / GIB, "the container's memory limit")
    return best


def memory_budget(
    environ: Mapping[str, str] = os.environ, proc: Path = Path("/proc")
) -> HostMemory | None:
    """What a CPU run may still take: `read_host_memory`, capped by `KUBETUNE_HOST_MEMORY_GIB`
    when that is set.

    Raises:
        ValueError: the variable is not a positive number of GiB (the message says so).
    """
    found = read_host_memory(proc)
    raw = environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return found
    try:
        cap = float(raw)
    except ValueError:
        cap = -1.0
    if not cap > 0:  # also NaN
        raise ValueError(f"{BUDGET_ENV}={raw!r} is not a positive number of GiB; set e.g. 8")
    if found is None or cap < found.available_gib:
        return HostMemory(cap, BUDGET_ENV)
    return found


def reset_peak_resident(proc: Path = Path("/proc")) -> bool:
    """Reset this process's peak resident memory (VmHWM; Linux 4.0+), so that the next
    `peak_resident_gib` covers what follows. False where the kernel does not allow it."""
    try:
        (proc / "self" / "clear_refs").write_text("5", encoding="utf-8")
    except OSError:
        return False
    return True


def _status_kib(text: str, key: str) -> int | None:
    """A `key:  N kB` line of /proc/self/status, in bytes."""
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return None


def status_peak_resident(text: str) -> int | None:
    """VmHWM of /proc/self/status (the peak resident set), in bytes."""
    return _status_kib(text, "VmHWM")


def peak_resident_gib(proc: Path = Path("/proc")) -> float | None:
    """This process's peak resident memory since the last reset (or its start), in GiB."""
    peak = status_peak_resident(_read(proc / "self" / "status") or "")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return peak / GIB


def resident_gib(proc: Path = Path("/proc")) -> float | None:
    """This process's resident memory now (VmRSS), in GiB."""
    held = _status_kib(_read(proc / "self" / "status") or "", "VmRSS")
    return None if held is None else held / GIB
