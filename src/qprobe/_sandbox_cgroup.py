"""Per-job memory and process limits and the job's CPU clock: cgroups where this process may write
them, /proc otherwise.

Loaded by the sandbox worker (standard library only, nothing from qprobe). A worker that may write
a cgroup hierarchy (v1: its own `memory` and `pids` cgroups, and `cpuacct` if there, accept a child;
v2: its own cgroup can enable `memory` and `pids` for children) makes a cgroup `qprobe-<pid>-<rand>`
per controller and moves itself in. It runs one job at a time, so each job's processes are born in
it; before a job the limits are set (`memory.limit_in_bytes` / `memory.max` = the job's memory, swap
0, `pids.max` = its processes + 2 for the worker and the job's short-lived intermediate process)
(like RLIMIT_NPROC per uid, pids.max also counts a killed earlier job's processes while the kernel
tears them down, which takes a millisecond or so). Job processes have
oom_score_adj 1000, so a job over its memory loses its own processes, not the worker. One cgroup per worker and not per job: moving a process into a cgroup costs
~2 ms (an RCU grace period), more than a whole honest check.

The CPU clock of a job (`Meter`) is the cgroup's CPU usage since the job began where a CPU
controller is in use (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`; it includes the worker's own
fraction of a millisecond per job), else the sum of utime + stime + cutime + cstime over the job's
process tree in /proc (the processes it started and the children they reaped). Processes that
escape the tree there (reaped with SIGCHLD ignored) are missed; the wall-clock backstop bounds them.
"""

from __future__ import annotations

import os
import time

BACKSTOP_FACTOR, BACKSTOP_EXTRA = 4.0, 2.0  # wall-clock backstop: 4 x the CPU limit + 2 s
POLL = 0.05  # seconds between two reads of the CPU clock while a job runs
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def backstop(timeout: float) -> float:
    """Wall-clock seconds after which a job is stopped whatever its CPU time."""
    return BACKSTOP_FACTOR * float(timeout) + BACKSTOP_EXTRA


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # cgroupfs refuses new files
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


# ------------------------------------------------------------------ where the hierarchies are


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape")


def locate(mountinfo: str, proc_cgroup: str) -> dict:
    """{"v2": dir} or {"v1": {controller: dir}}: this process's own cgroups, from the text of
    /proc/self/mountinfo and /proc/self/cgroup (pure: tests pass a fake tree's texts)."""
    mine: dict[str, str] = {}  # controller ("" for v2) -> path inside its hierarchy
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctl in parts[1].split(",") if parts[1] else [""]:
                mine[ctl] = parts[2]
    v1: dict[str, str] = {}
    v2 = ""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        root, point, fstype, opts = _unescape(fields[3]), _unescape(fields[4]), rest[0], rest[2].split(",")

        def inside(path: str, root: str = root, point: str = point) -> str | None:
            rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
            return None if rel.startswith("..") else os.path.normpath(os.path.join(point, rel))

        if fstype == "cgroup2" and "" in mine and not v2:
            v2 = inside(mine[""]) or ""
        elif fstype == "cgroup":
            for ctl in ("memory", "pids", "cpuacct"):
                if ctl in opts and ctl in mine and ctl not in v1:
                    d = inside(mine[ctl])
                    if d:
                        v1[ctl] = d
    if v1.get("memory") and v1.get("pids"):
        return {"v1": v1}
    return {"v2": v2} if v2 else {}


# ------------------------------------------------------------------ the worker's cgroups


class Cgroups:
    """The worker's own cgroup per controller: the worker runs one job at a time inside it, so every
    process of the job is born in it (moving each job into a cgroup of its own costs ~2 ms a job)."""

    def __init__(self, version: str, tops: dict[str, str]) -> None:
        self.version = version  # "v1" | "v2"
        self.tops = tops  # controller -> the worker's cgroup dir (v2: {"": dir})
        self.limits: tuple | None = None  # the (memory, pids) last written
        self.cpu = "cpuacct" in tops if version == "v1" else True

    def describe(self) -> str:
        ctls = ["memory", "pids"] + (["cpuacct" if self.version == "v1" else "cpu"] if self.cpu else [])
        return f"cgroup-{self.version}({','.join(ctls)})"

    def _dir(self, ctl: str) -> str:
        return self.tops.get(ctl, self.tops.get("", ""))

    def limit(self, memory_bytes: int, pids: int) -> None:
        """The job's limits: `memory_bytes` in all, `pids` processes besides the worker and the job's
        intermediate process. Written only when they change."""
        if self.limits == (memory_bytes, pids):
            return
        self.limits = None  # a half-written pair must be rewritten next time
        if self.version == "v2":
            d = self.tops[""]
            _write(os.path.join(d, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                _write(os.path.join(d, "memory.swap.max"), "0")
        else:
            mem = self.tops["memory"]
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            try:  # memsw >= limit at all times: raise memsw first when growing, lower it last when shrinking
                _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
                if os.path.exists(memsw):
                    _write(memsw, str(memory_bytes))
            except OSError:
                _write(memsw, str(memory_bytes))
                _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
        _write(os.path.join(self._dir("pids"), "pids.max"), str(pids + 2))
        self.limits = (memory_bytes, pids)

    def usage(self) -> float:
        """CPU seconds used so far by every process that was ever in the cgroup."""
        if self.version == "v2":
            for line in _read(os.path.join(self.tops[""], "cpu.stat")).splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            raise OSError("cpu.stat has no usage_usec")
        return int(_read(os.path.join(self.tops["cpuacct"], "cpuacct.usage"))) / 1e9


def setup(found: dict, name: str) -> Cgroups | None:
    """Make the worker's cgroups below `found` (from `locate`) and move this process into them;
    None where they are not writable (nothing is left behind then)."""
    made: list[str] = []
    try:
        if "v1" in found:
            tops = {c: os.path.join(d, name) for c, d in found["v1"].items()}
            for d in tops.values():
                os.makedirs(d, exist_ok=True)  # exist_ok: our own name only (a fake tree lays it out)
                made.append(d)
            cg = Cgroups("v1", tops)
        elif "v2" in found:
            parent = found["v2"]
            if not {"memory", "pids"} <= set(_read(os.path.join(parent, "cgroup.subtree_control")).split()):
                # Fails (EBUSY) where the parent holds processes; then there is no v2 limit here.
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
            top = os.path.join(parent, name)
            os.makedirs(top, exist_ok=True)
            made.append(top)
            cg = Cgroups("v2", {"": top})
        else:
            return None
        cg.limit(64 << 20, 8)  # writes the limit files once: a read-only tree fails here
        enter(list(cg.tops.values()))
    except OSError:
        for d in reversed(made):
            try:
                os.rmdir(d)
            except OSError:
                pass
        return None
    if cg.cpu:
        try:
            cg.usage()
        except OSError:
            cg.cpu = False  # memory and pids still limited; the CPU clock reads /proc instead
    return cg


def discover(name: str) -> Cgroups | None:
    """This worker's cgroups on this machine, or None (then rlimits alone limit memory and processes).
    The worker's parent removes them once the worker is gone (`cgroup_dirs` in its hello)."""
    try:
        found = locate(_read("/proc/self/mountinfo"), _read("/proc/self/cgroup"))
    except OSError:
        return None
    return setup(found, name)


def enter(dirs: list[str]) -> None:
    """Move this process into these cgroups (its children are born there)."""
    for d in dirs:
        _write(os.path.join(d, "cgroup.procs"), "0")


# ------------------------------------------------------------------ the job's CPU clock


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out += [int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split()]
        except OSError:
            pass
    return out


def _times(pid: int) -> float:
    try:
        fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / _TICK  # utime stime cutime cstime


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and all their descendants (live, zombie or reaped by them)."""
    seen: set[int] = set()
    todo, total = list(pids), 0.0
    while todo:
        pid = todo.pop()
        if pid in seen or len(seen) > 4096:
            continue
        seen.add(pid)
        total += _times(pid)
        todo += _children(pid)
    return total


class Meter:
    """The CPU clock of one job: its cgroup's usage since the job began, else the /proc process tree of the pids it
    `watch`es (with `orphans`, no pid namespace: every child of this worker, where escaped processes
    land; this worker runs one job at a time)."""

    def __init__(self, cg: Cgroups | None = None, orphans: bool = False) -> None:
        self.cg, self.orphans = cg, orphans
        self.pids: list[int] = []
        self.source = "cgroup" if cg is not None and cg.cpu else "proc"
        self.base = cg.usage() if self.source == "cgroup" else 0.0  # type: ignore[union-attr]
        self.last = 0.0
        self.checked = time.monotonic()

    def watch(self, *pids: int | None) -> None:
        """Count these processes and their descendants too (the /proc clock needs them)."""
        self.pids += [p for p in pids if p]

    def cpu(self) -> float:
        """CPU seconds the job used so far (never decreasing)."""
        try:
            if self.source == "cgroup":
                used = self.cg.usage() - self.base  # type: ignore[union-attr]
            else:
                used = tree_cpu(self.pids + (_children(os.getpid()) if self.orphans else []))
        except OSError:
            used = self.last
        self.last = max(self.last, used)  # a process reaped between two reads must not lower it
        self.checked = time.monotonic()
        return self.last

    def over(self, limit: float) -> bool:
        """Whether the job used `limit` CPU seconds; reads the clock at most every POLL / 2 seconds."""
        if time.monotonic() - self.checked < POLL / 2:
            return self.last >= limit
        return self.cpu() >= limit

    def report(self, timed_out: str, limit: float) -> dict:
        """What the result records: CPU seconds, which clock, and for a timeout which limit fired."""
        out = {"cpu_time": round(self.cpu(), 4), "clock": f"cpu({self.source})"}
        if timed_out == "wall":
            out["message"] = (f"wall-clock backstop of {backstop(limit):g} s exceeded (CPU limit {limit:g} s, "
                              f"used {out['cpu_time']:g} s)")
        elif timed_out:
            out["message"] = f"CPU time limit of {limit:g} s exceeded (all the job's processes)"
        return {**out, **({"limit_hit": timed_out} if timed_out else {})}
