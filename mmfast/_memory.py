"""Peak host memory of a call, for the benchmarks, the tests and the demo's fused-vs-naive table."""
from __future__ import annotations

import resource


def peak_growth(fn) -> int:
    """Bytes by which the resident set's peak during fn() exceeds the resident set before it.

    On Linux the peak (VmHWM) is reset to the current RSS first (/proc/self/clear_refs), so what
    the inputs' creation left behind (a freed temporary the size of an input, say) cannot hide
    what fn allocates below that old peak. Elsewhere: growth of the lifetime peak (ru_maxrss).
    Freed blocks that malloc keeps cached count as resident: large ones (over glibc's mmap
    threshold) go back to the system at once.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - before) * 1024
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
