"""The sandbox's warm worker ("zygote"): a fresh `python -I` process that forks one child per program.

Run only by `qprobe.sandbox` (standard library only, nothing from qprobe). It talks to its parent
over two pipes with length-prefixed JSON. Per job it forks A, which enters a fresh pid + mount
namespace (where available) and forks B, the init of that namespace; A exits at once so B is
re-parented to this worker (a child sub-reaper). B enters a fresh IPC namespace, mounts a
size-capped tmpfs on its working directory and a fresh /proc inside the jobs' own root (built once
per worker), pivots into that root, drops privileges, sets rlimits, then runs the program and its
tests. The worker lives in its own cgroup where it may make one, so the job's processes are born there. Killing B (the namespace's init) kills every process the
program started. The time limit (CPU time of the whole job, `_sandbox_cgroup.Meter`, with a
wall-clock backstop) is enforced here, outside the namespace.

A pass is reported only by the harness after the last test statement returned, as a JSON line
carrying a per-job random nonce on a randomly numbered fd, and only counts if B then exits 0.

This file is the worker's loop (fork, wait, timeouts, verdicts, the pipe protocol); how B is confined
and runs the tests, and which isolation works here, is `_sandbox_confine.py`.
"""

from __future__ import annotations

import builtins
import json
import os
import select
import signal
import struct
import sys
import time
import types


def _load_sibling(name: str) -> types.ModuleType:
    """A module beside this file, loaded by path (`python -I` puts no directory on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_confine = _load_sibling("_sandbox_confine")
CLONE_NEWNS, CLONE_NEWPID = _confine.CLONE_NEWNS, _confine.CLONE_NEWPID
unshare, probe_features, start_meter = _confine.unshare, _confine.probe_features, _confine.start_meter
worker_view, job_main, backstop, POLL = _confine.worker_view, _confine.job_main, _confine.cgroup.backstop, \
    _confine.cgroup.POLL


def level_string(feats: dict) -> str:
    """E.g. 'namespaces(net,pid,mount,ipc)+own-ro-root+tmpfs-cwd+proc+setuid+cgroup-v1(memory,pids,cpuacct)
    +cpu-clock(cgroup)+rlimits'; below net+pid+mount it starts with 'UNCONFINED'."""
    ns = [n for n in ("net", "pid", "mount", "ipc") if feats.get(n)]
    if feats["userns"]:
        ns.append("user")
    missing = [n for n in ("net", "pid", "mount") if not feats.get(n)]
    parts = [f"UNCONFINED(no {','.join(missing)} namespace{'s' if len(missing) > 1 else ''})"] if missing else []
    parts += [f"namespaces({','.join(ns)})"] if ns else []
    if feats["mount"]:
        parts.append("own-ro-root+tmpfs-cwd+proc")
    if feats["root"]:
        # Degraded: the job's uid cannot import modules the worker did not preload.
        parts.append("setuid(python-unreadable)" if feats.get("python_unreadable") else "setuid")
    if feats.get("cgroup"):
        parts.append(feats["cgroup"])
    return "+".join(parts + [f"cpu-clock({feats.get('cpu_clock', 'proc')})", "rlimits"])


def _kill_stragglers(pid_b: int, uid: int | None) -> None:
    """Without a pid namespace: kill B's group, then anything re-parented to us (sub-reaper)."""
    for _ in range(50):
        if uid is not None:  # root: a helper with the job's uid kills every process of that uid
            if os.fork() == 0:
                os.setresuid(uid, uid, uid)
                try:
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
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


def _final_report(rep: bytes, nonce: str) -> bool:
    """A complete, well-formed harness report: the verdict is known before the process exits."""
    if not rep.endswith(b"\n") or rep.count(b"\n") != 1:
        return False
    try:
        info = json.loads(rep)
    except ValueError:
        return False
    return isinstance(info, dict) and (info.get("outcome") in ("failed", "error") or
                                       (info.get("outcome") == "passed" and info.get("nonce") == nonce))


def run_job(job: dict, cfg: dict, feats: dict, base: str) -> dict:
    _reap_pending()
    cfg = {**cfg, **job.get("limits", {})}
    meter = start_meter(cfg, feats)  # the job's cgroup limits and its CPU clock
    nonce = os.urandom(16).hex()
    workdir = os.path.join(base, os.urandom(8).hex())
    os.mkdir(workdir, 0o777)
    os.chmod(workdir, 0o777)
    rep_r, rep_w = os.pipe()
    out_r, out_w = os.pipe()
    pid_r, pid_w = os.pipe()
    sync_r, sync_w = os.pipe()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce.encode())
    os.close(nonce_w)
    t0 = time.monotonic()
    a = os.fork()
    if a == 0:
        try:
            os.close(rep_r), os.close(out_r), os.close(pid_r), os.close(sync_w)
            if feats["pid"]:
                unshare(CLONE_NEWPID | CLONE_NEWNS)
            b = os.fork()
            if b == 0:
                os.close(pid_w)
                try:
                    job_main(job, cfg, feats, workdir, nonce_r, rep_w, out_w, sync_r)
                except BaseException:  # noqa: BLE001  (harness bug: no report, so never a pass)
                    import traceback

                    os.write(2, traceback.format_exc()[-2000:].encode())
                os._exit(120)
            os.write(pid_w, struct.pack("<i", b))
        finally:
            os._exit(0)
    for fd in (rep_w, out_w, pid_w, sync_r, nonce_r):
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
    out, out_total, rep, timed_out, too_much, status = bytearray(), 0, bytearray(), False, False, None
    early = False
    pidfd = os.pidfd_open(b) if b else None
    open_fds = [fd for fd in (rep_r, out_r) if fd is not None]
    while b:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = "wall"
            break
        ready, _, _ = select.select(open_fds + [pidfd], [], [], min(left, POLL))
        for fd in ready:
            if fd == pidfd:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.remove(fd)
            elif fd == out_r:
                out_total += len(chunk)
                out = (out + chunk)[-cfg["tail_bytes"]:]
            else:
                rep += chunk
                # With a pid namespace, killing B later reaps everything: no need to wait for the
                # namespace's teardown before answering.
                early = feats["pid"] and _final_report(bytes(rep), nonce)
        if early:
            break
        if out_total > (cfg["output_kb"] << 10) or len(rep) > 1 << 16:
            too_much = True
            break
        if pidfd in ready:
            break
        if meter.over(cfg["timeout"]):
            timed_out = "cpu"
            break
    meter.cpu()  # before B is reaped: /proc still holds its times
    duration = time.monotonic() - t0
    if b:
        try:
            os.kill(b, signal.SIGKILL) if (timed_out or too_much or early) else None
        except OSError:
            pass
        if not feats["pid"]:
            try:
                os.killpg(b, signal.SIGKILL)  # B is not reaped yet, so its group id is still its own
            except OSError:
                pass
        try:
            if early:
                _PENDING.append(b)
            else:
                status = os.waitpid(b, 0)[1]
        except ChildProcessError:
            status = None
        if not feats["pid"]:
            _kill_stragglers(b, cfg["uid"] if feats["root"] else None)
        os.close(pidfd)
    for fd in (rep_r, out_r):  # whatever is left in the pipes (writers are all dead now)
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 1 << 16):
                if fd == rep_r and len(rep) < 1 << 16:
                    rep += chunk
                elif fd == out_r:
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
    res = verdict(nonce, rep, status, timed_out, too_much, duration, out.decode("utf-8", "replace"), cfg, early)
    return {**res, **meter.report((timed_out or "cpu") if res["status"] == "timeout" else "", cfg["timeout"])}


def verdict(nonce: str, rep: bytes, status, timed_out: bool, too_much: bool, duration: float, tail: str,
            cfg: dict, early: bool = False) -> dict:
    res = {"status": "error", "error_type": "", "failing_test": "", "message": "", "stderr_tail": tail,
           "duration": round(duration, 4)}
    if timed_out:
        return {**res, "status": "timeout", "error_type": "TimeoutError",
                "message": f"wall-clock limit of {cfg['timeout']} s exceeded"}
    if too_much:
        return {**res, "error_type": "OutputLimitExceeded", "message": f"more than {cfg['output_kb']} KiB of output"}
    lines = bytes(rep).splitlines()
    info = None
    if len(lines) == 1:
        try:
            info = json.loads(lines[0])
        except ValueError:
            info = None
    code = None  # B mirrors C: exit code, or 128 + signal number
    if status is not None:
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    if not isinstance(info, dict) or info.get("outcome") not in ("passed", "failed", "error", "sandbox"):
        sig = code - 128 if code is not None and code > 128 else None
        if sig in (signal.SIGXCPU, signal.SIGKILL) and duration >= cfg["timeout"] * 0.9:
            return {**res, "status": "timeout", "error_type": "TimeoutError", "message": "CPU time limit exceeded"}
        try:
            signame = signal.Signals(sig).name if sig else ""
        except ValueError:
            signame = f"signal {sig}"
        what = (f"was killed by {signame}" if sig else
                f"exited with code {code}" if code is not None else "vanished")
        kind = "Killed" if sig else "EarlyExit"
        if rep:
            kind, what = "ReportTampered", "wrote to the result channel"
        return {**res, "error_type": kind, "message": f"the program {what} before its tests finished"}
    outcome = info["outcome"]
    res.update(error_type=str(info.get("error_type", ""))[:200], message=str(info.get("message", ""))[:500],
               failing_test=str(info.get("line", ""))[:500])
    if outcome == "sandbox":
        return {**res, "error_type": "SandboxError"}
    if outcome == "passed":
        if info.get("nonce") != nonce:
            return {**res, "error_type": "ReportForged", "message": "a pass was reported without the job's nonce"}
        if code != 0 and not early:  # early: the report was final, B was killed on purpose
            return {**res, "error_type": "EarlyExit", "message": f"exit code {code} after the tests passed"}
        return {**res, "status": "passed"}
    return {**res, "status": "failed" if outcome == "failed" else "error"}


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
