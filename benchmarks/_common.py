"""Helpers shared by the benchmark scripts: the machine description, a probe of the CPU other
processes use during a timing, and the collection of per-rank results from spawned ranks."""

from __future__ import annotations

import datetime
import os
import platform
import time


def machine_info() -> dict:
    import torch

    cpu, flags = "?", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {"cpu": cpu, "cpu_flags": sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512_bf16"}),
            "cores": os.cpu_count(), "mem_gib": round(mem_kib / 2**20, 1), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg_at_start": os.getloadavg()}


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has been busy (user..steal, not idle/iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU-seconds of this process, its reaped children and its live descendants."""
    import psutil
    t = os.times()
    s = t.user + t.system + t.children_user + t.children_system
    for c in psutil.Process().children(recursive=True):
        try:
            ct = c.cpu_times()
            s += ct.user + ct.system
        except psutil.Error:
            pass
    return s


class LoadProbe:
    """Wall time of a block and the cores other processes kept busy meanwhile."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_s(), own_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        foreign = (busy_cpu_s() - self.busy0) - (own_cpu_s() - self.own0)
        self.other = max(0.0, foreign) / max(self.wall, 1e-9)
        self.loadavg = os.getloadavg()[0]
        return False


def collect_results(procs: list, queue, world: int, timeout_s: float) -> list:
    """Wait for ``(rank, status, value)`` from every rank process; raise naming failed or dead ranks."""
    results, errors = {}, []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world and not errors:
            try:
                rank, status, value = queue.get(timeout=5)
            except Exception:  # queue.Empty: check that every rank still lives
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead:
                    errors.append(f"rank(s) {dead} exited without a result (exit codes "
                                  f"{[procs[r].exitcode for r in dead]})")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout_s} s")
                continue
            if status != "ok":
                errors.append(f"rank {rank}:\n{value}")
            else:
                results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
