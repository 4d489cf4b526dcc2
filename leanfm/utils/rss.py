"""The kernel's peak-RSS mark, shared by the cost harness (leanfm.bench) and the memory planner (leanfm.tune)."""

from __future__ import annotations


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS. False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
