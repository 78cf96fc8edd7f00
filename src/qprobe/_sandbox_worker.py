"""The sandbox's warm worker ("zygote"): a fresh `python -I` process that forks one child per program.

Run only by `qprobe.sandbox` (standard library only, nothing from qprobe). It talks to its parent
over two pipes with length-prefixed JSON. Per job it forks A, which enters a fresh pid + mount
namespace (where available) and forks B, the init of that namespace; A exits at once so B is
re-parented to this worker (a child sub-reaper). B enters a fresh IPC namespace, mounts a
size-capped tmpfs on its working directory and a fresh /proc inside the jobs' own root (built once
per worker), pivots into that root, drops privileges, sets rlimits, then runs the program and
answers T's calls. The worker lives in its own cgroup where it may make one, so the job's processes
(and T) are born there. Killing B (the namespace's init) kills every process the program started.
The time limit (CPU time of the whole job, `_sandbox_cgroup.Meter`, with a wall-clock backstop) is
enforced here, outside the namespace.

Beside B it keeps T, its test process (forked once, restarted after a job that timed out), which
never receives or runs model-written code: per job it gets the tests and B's socket (over
SCM_RIGHTS), runs the tests and calls into B, judging copies of B's values. The verdict is T's
one-line report on the worker<->T socket, which A closes before forking B (B never holds it);
B's exit status only refines an error (killed by which signal, CPU limit).

This file is the worker's loop (fork, wait, timeouts, verdicts, the pipe protocol); how B is
confined and which isolation works here is `_sandbox_confine.py`; what B and T run is
`_sandbox_harness.py` and `_sandbox_tests.py`, the copies `_sandbox_codec.py`.
"""

from __future__ import annotations

import builtins
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import types


def _load_sibling(name: str) -> types.ModuleType:
    """A module beside this file, loaded by path (`python -I` puts no directory on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    if spec is None or spec.loader is None:  # never for a .py file; using None here raised AttributeError too
        raise AttributeError(f"no loader for {name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_confine = _load_sibling("_sandbox_confine")
_load_sibling("_sandbox_codec")
_load_sibling("_sandbox_tests")
_harness = _load_sibling("_sandbox_harness")
CLONE_NEWNS, CLONE_NEWPID = _confine.CLONE_NEWNS, _confine.CLONE_NEWPID
unshare, probe_features, start_meter = _confine.unshare, _confine.probe_features, _confine.start_meter
level_string, _fork = _confine.level_string, _confine.fork
worker_view, backstop, POLL = _confine.worker_view, _confine.cgroup.backstop, _confine.cgroup.POLL
job_main, test_server_main = _harness.job_main, _harness.test_server_main
verdict, _final_report = _harness.verdict, _harness.final_report


def _kill_stragglers(pid_b: int, uid: int | None) -> None:
    """Without a pid namespace: kill B's group, then anything re-parented to us (sub-reaper)."""
    for _ in range(50):
        helper = None
        if uid is not None:  # root: a helper with the job's uid kills every process of that uid
            helper = os.fork()
            if helper == 0:
                os.setresuid(uid, uid, uid)
                try:
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
        me = str(os.getpid())
        kids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[1] == me:
                            kids.append(int(name))
                except (OSError, IndexError):
                    pass
        kids = [k for k in kids if k != _T.get("pid")]  # our test process is not a job's
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                return
        if not kids:  # only our test process is left
            return
        time.sleep(0.002)


_PENDING: list[int] = []  # killed jobs whose namespaces the kernel is still tearing down


def _reap_pending() -> None:
    for pid in list(_PENDING):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                continue
        except ChildProcessError:
            pass
        _PENDING.remove(pid)


def _kill_b(b: int, feats: dict, cfg: dict, keep_waiting: bool, drain: bool = False) -> int | None:
    """Kill B and everything it started; its wait status when it was reaped here.

    `drain` (a job that ran out of time, e.g. a fork bomb): wait until its namespace is gone, since
    its dying processes still count against the worker's pids cgroup, and a first fork that fails in
    the next job's fresh pid namespace leaves that namespace unusable (ENOMEM on every later fork)."""
    status = None
    if not keep_waiting:
        try:
            os.kill(b, signal.SIGKILL)
        except OSError:
            pass
    if not feats["pid"]:
        try:
            os.killpg(b, signal.SIGKILL)  # B is not reaped yet, so its group id is still its own
        except OSError:
            pass
    try:
        if feats["pid"] and not keep_waiting and not drain:
            _PENDING.append(b)  # killing the namespace's init reaps it all; no need to wait here
        else:
            status = os.waitpid(b, 0)[1]
    except ChildProcessError:
        pass
    if not feats["pid"]:
        _kill_stragglers(b, cfg["uid"] if feats["root"] else None)
    return status


_T: dict = {}  # the worker's test process: pid, ctrl (socket), pidfd
_JOBS = [0]
_PINNED: list[bool] = []


def _pin(cfg: dict) -> None:
    """Once: this worker, its T and its jobs share one core (workers spread over the cores). A call
    from T to B and back is then a switch on one core, not a wake-up across cores: ~15% more
    checks per second at 2 workers on 2 busy cores."""
    if not _PINNED:
        try:
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[cfg["uid"] % len(cpus)]})
        except (OSError, AttributeError):
            pass
        _PINNED.append(True)


def _test_server(cfg: dict, feats: dict) -> dict:
    """The test process T, started once and again after it was killed; it never runs model code."""
    if _T and select.select([_T["pidfd"]], [], [], 0)[0]:
        _stop_test_server()  # it died between jobs: this job gets a fresh one, not its death
    if _T:
        return _T
    c_w, c_t = socket.socketpair()
    pid = _fork()
    if pid == 0:
        try:
            c_w.close()
            test_server_main(cfg, feats, c_t.detach())
        finally:
            os._exit(120)
    c_t.close()
    _T.update(pid=pid, ctrl=c_w, pidfd=os.pidfd_open(pid))
    return _T


def _stop_test_server() -> int | None:
    """Kill T (stuck in a test, or its answer is no longer wanted); its wait status."""
    if not _T:
        return None
    try:
        os.kill(_T["pid"], signal.SIGKILL)
    except OSError:
        pass
    try:
        status = os.waitpid(_T["pid"], 0)[1]
    except ChildProcessError:
        status = None
    _T["ctrl"].close()
    os.close(_T["pidfd"])
    _T.clear()
    return status


def run_job(job: dict, cfg: dict, feats: dict, base: str) -> dict:
    """One job: B (the program, confined), forked from here, and T (the tests, which never see or
    run the program's code); the verdict is T's report on a socket B never held."""
    _reap_pending()
    gc.freeze()  # the children's garbage collector never walks (so never copies) the worker's pages
    cfg = {**cfg, **job.get("limits", {})}
    _pin(cfg)
    t = _test_server(cfg, feats)
    meter = start_meter(cfg, feats)  # the job's cgroup limits and its CPU clock (T's share too, in a cgroup)
    workdir = os.path.join(base, os.urandom(8).hex())
    os.mkdir(workdir, 0o777)
    os.chmod(workdir, 0o777)
    s_t, s_b = (s.detach() for s in socket.socketpair())
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    pid_r, pid_w = os.pipe()
    sync_r, sync_w = os.pipe()
    t0 = time.monotonic()
    a = _fork()
    if a == 0:
        try:
            for fd in (t["ctrl"].fileno(), t["pidfd"], s_t, out_r, st_r, pid_r, sync_w):
                os.close(fd)  # first of all: B never holds T's report socket
            if feats["pid"]:
                unshare(CLONE_NEWPID | CLONE_NEWNS)
            b: int | None = _fork()  # B's pid; below, in the worker: as A reports it (None: it did not)
            if b == 0:
                os.close(pid_w)
                try:
                    job_main(job, cfg, feats, workdir, s_b, st_w, out_w, sync_r)
                except BaseException:  # noqa: BLE001  (harness bug: B gone, never a pass)
                    pass
                os._exit(120)
            os.write(pid_w, struct.pack("<i", b))
        finally:
            os._exit(0)
    _JOBS[0] += 1
    job_id = _JOBS[0]
    body = json.dumps({k: v for k, v in job.items() if k != "program"} | {"id": job_id}).encode()
    try:  # T starts on the tests while A and B set up
        socket.send_fds(t["ctrl"], [len(body).to_bytes(8, "little")], [s_t, out_w])
        t["ctrl"].sendall(body)
    except OSError:
        pass  # T is gone: no report, an error
    for fd in (s_t, s_b, st_w, pid_w, sync_r, out_w):
        os.close(fd)
    os.waitpid(a, 0)
    try:
        os.write(sync_w, b"g")
    except OSError:
        pass
    os.close(sync_w)
    raw = os.read(pid_r, 4)
    os.close(pid_r)
    b = struct.unpack("<i", raw)[0] if len(raw) == 4 else None
    meter.watch(b)
    deadline = t0 + backstop(cfg["timeout"])  # the limit is on CPU time; this wall clock is a backstop
    out, out_total, rep, setup = bytearray(), 0, bytearray(), bytearray()
    timed_out: str = ""
    too_much = done = t_died = False
    ctrl = t["ctrl"].fileno()
    open_fds = [ctrl, out_r, st_r]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = "wall"
            break
        ready, _, _ = select.select(open_fds + [t["pidfd"]], [], [], min(left, POLL))
        for fd in ready:
            if fd == t["pidfd"]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.remove(fd)
            elif fd == out_r:
                out_total += len(chunk)
                out = (out + chunk)[-cfg["tail_bytes"]:]
            elif fd == st_r:
                setup += chunk[:1024]
            else:
                rep += chunk
                done = _final_report(bytes(rep))
        t_died = t["pidfd"] in ready or ctrl not in open_fds
        if done or t_died:
            break
        if out_total > (cfg["output_kb"] << 10) or len(rep) > 1 << 16:
            too_much = True
            break
        if meter.over(cfg["timeout"]):
            timed_out = "cpu"
            break
    meter.cpu()  # before B is reaped: /proc still holds its times
    duration = time.monotonic() - t0
    try:
        info = json.loads(rep) if done else None
    except ValueError:
        info = None
    t_status = None
    if not (isinstance(info, dict) and info.pop("job", None) == job_id):
        info = None
        t_status = _stop_test_server()  # stuck, dead or out of step: the next job gets a fresh T
    gone = isinstance(info, dict) and bool(info.get("program_gone"))  # B ended on its own: get its status
    b_status = _kill_b(b, feats, cfg, keep_waiting=gone and not timed_out, drain=bool(timed_out or too_much)) if b else None
    for fd in (out_r, st_r):  # whatever is left in the pipes (writers are all dead now)
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 1 << 16):
                if fd == st_r:
                    setup += chunk[:1024]
                else:
                    out = (out + chunk)[-cfg["tail_bytes"]:]
        except BlockingIOError:
            pass
        os.close(fd)
    if not feats["mount"]:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        try:
            os.rmdir(workdir)
        except OSError:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    report = (json.dumps(info).encode() + b"\n") if info is not None else b""
    res = verdict(report, t_status, b_status, bytes(setup), bool(timed_out), too_much, duration,
                  out.decode("utf-8", "replace"), cfg)
    return {**res, **meter.report((timed_out or "cpu") if res["status"] == "timeout" else "", cfg["timeout"])}


def _recv(fd: int) -> dict | None:
    head = b""
    while len(head) < 4:
        chunk = os.read(fd, 4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack("<I", head)
    body = bytearray()
    while len(body) < n:
        chunk = os.read(fd, min(1 << 20, n - len(body)))
        if not chunk:
            return None
        body += chunk
    return json.loads(body)


def _send(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack("<I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def main() -> None:
    cfg = json.loads(sys.argv[1])
    proto_in, proto_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    base = os.path.join(cfg["tmp"], "qprobe-sandbox-" + os.urandom(6).hex())  # type: ignore[operator]
    os.mkdir(base, 0o711)
    try:
        try:
            feats = probe_features(cfg, base)
            if feats["mount"]:
                unshare(CLONE_NEWNS)
                worker_view(cfg, feats, base)
        except Exception as exc:  # noqa: BLE001  one line for the user, not a traceback
            _send(proto_out, {"error": f"{type(exc).__name__}: {exc}"[:500], "base": base})
            return
        # Not dumpable: a job with our uid cannot open our descriptors through /proc (B turns it back
        # on for itself until it is confined; T stays so).
        _confine.prctl(_confine.PR_SET_DUMPABLE, 0)
        _send(proto_out, {"level": level_string(feats), "features": feats, "base": base})
        while (job := _recv(proto_in)) is not None:
            try:
                res = run_job(job, cfg, feats, base)
            except Exception as exc:  # noqa: BLE001  a worker-side failure is an error, not a pass
                res = {"status": "error", "error_type": "SandboxError", "failing_test": "", "message": repr(exc),
                       "stderr_tail": "", "duration": 0.0}
            _send(proto_out, res)
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    builtins.__dict__.pop("_", None)
    main()
