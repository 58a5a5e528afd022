"""What every benchmark shares: one result row, timing of interleaved repeats, peak memory.

Timings are taken side by side in one process: baseline and optimised runs alternate, so machine
load hits both alike; each row reports the best of the repeats (the least disturbed: the
shortest time, the highest rate) and the spread of the wall time ((max - min) / best over the
repeats: the run-to-run noise), and the process CPU time (all threads), which other processes
on a shared machine disturb less. Peak memory is the process's resident set above where the measured code started
(the kernel's high-water mark, reset first; freed heap handed back to the system first), or CUDA's peak
allocation. It is measured in a run of its own, after the timed ones: handing the heap back makes the
next run fault its pages in again, which cost short steps up to a third of their time when both were
measured at once, and more in the pieces a ceiling is computed from.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Repeats of one measured piece: wall and CPU seconds each."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    rate: bool = False  # the values are rates (tokens/s): the best is the highest

    @property
    def best(self) -> float:
        return max(self.wall) if self.rate else min(self.wall)

    @property
    def cpu_best(self) -> float:
        return max(self.cpu) if self.rate else min(self.cpu)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def spread(self) -> float:
        """(max - min) / best of the wall times: the run-to-run noise of this piece."""
        return (max(self.wall) - min(self.wall)) / self.best if len(self.wall) > 1 else 0.0


@dataclass
class Row:
    """One line of the table: an optimisation against its baseline on the same model and data."""

    name: str
    baseline: str  # what the baseline is, in words
    base: Timing
    fast: Timing
    unit: str = "s"  # what the timings count (per step, per turn, ...)
    note: str = ""
    higher_is_better: bool = False  # rates (tokens/s): the ratio is fast / base
    target: str = ""  # the target for this row and whether it is met, in words
    extra: dict = field(default_factory=dict)  # what a section keeps for rows derived from this one

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.fast.best / self.base.best
        return self.base.best / self.fast.best

    @property
    def cpu_ratio(self) -> float:
        if not self.base.cpu or not self.fast.cpu:
            return float("nan")
        if self.higher_is_better:
            return self.fast.cpu_best / self.base.cpu_best
        return self.base.cpu_best / self.fast.cpu_best


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_mark() -> int:
    """The process's peak resident set since the last reset (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_high_water_mark() -> bool:
    """Set the peak resident set to the current one (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Hand freed heap back to the system, so the measured code's growth shows in its RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yields a one-element list that holds, afterwards, the peak bytes above the start."""
    out = [0]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield out
        out[0] = torch.cuda.max_memory_allocated() - start
        return
    _trim_heap()
    start = _rss()
    if _reset_high_water_mark():
        yield out
        out[0] = max(_high_water_mark() - start, 0)
        return
    peak, done = [0], threading.Event()  # no resettable high-water mark: sample the resident set

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        done.set()
        sampler.join()
        out[0] = max(peak[0], _rss()) - start


@contextlib.contextmanager
def empty_compile_cache() -> Iterator[None]:
    """torch.compile's on-disk cache in a new empty folder while the block runs: its first compile
    is cold, as on a fresh machine (later ones in the block reuse it, as later runs would)."""
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def timed(fn: Callable[[], object], into: Timing, per: int = 1) -> object:
    """Run ``fn`` once, adding its wall / CPU seconds (divided by ``per``) to ``into``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    into.wall.append((time.perf_counter() - wall) / per)
    into.cpu.append((time.process_time() - cpu) / per)
    return result


def measure_peak(fn: Callable[[], object], into: Timing) -> object:
    """Run ``fn`` once, untimed, keeping the largest peak memory in ``into``."""
    with peak_memory() as peak:
        result = fn()
    into.peak_bytes = max(into.peak_bytes, peak[0])
    return result


def interleaved(pieces: dict[str, Callable[[], object]], repeats: int, per: int = 1) -> dict[str, Timing]:
    """Each piece once per round: an untimed warm-up round, ``repeats`` timed rounds, then one
    round for peak memory."""
    for fn in pieces.values():
        fn()
    timings = {name: Timing() for name in pieces}
    for _ in range(repeats):
        for name, fn in pieces.items():
            timed(fn, timings[name], per)
    for name, fn in pieces.items():
        measure_peak(fn, timings[name])
    return timings


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def machine() -> str:
    """The machine in words: CPU model, cores, threads torch uses, load average, GPU if any."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s)"
        f"{gpu}; load average {load}"
    )


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def table(rows: list[Row]) -> str:
    """The Markdown table ``python -m bench`` prints (and docs/performance.md holds)."""
    lines = [
        "| optimisation | baseline | baseline (best) | optimised (best) | ratio (wall) | ratio (CPU) | noise "
        "| peak memory baseline / optimised | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        noise = max(r.base.spread, r.fast.spread)
        cpu = "n/a" if math.isnan(r.cpu_ratio) else f"{r.cpu_ratio:.2f}x"
        spread = f"{noise:.0%}" if len(r.base.wall) > 1 else "n/a"
        lines.append(
            f"| {r.name} | {r.baseline} | {r.base.best:.4g} {r.unit} | {r.fast.best:.4g} {r.unit} | "
            f"{r.ratio:.2f}x | {cpu} | {spread} | {mib(r.base.peak_bytes)} / {mib(r.fast.peak_bytes)} | {r.note} |"
        )
    targets = [f"- {r.name}: {r.target}" for r in rows if r.target]
    return "\n".join(lines + (["", "Targets:", *targets] if targets else []))


def section_main(doc: str, rows: Callable[[bool], list[Row]]) -> None:
    """The command line of a section with nothing to set but ``--quick``: the machine, then its table."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    quick = p.parse_args().quick
    print(machine())
    print(table(rows(quick)))
