"""The sandbox's warm worker ("zygote"): a fresh `python -I` process that forks one child per program.

Run only by `qprobe.sandbox` (standard library only, nothing from qprobe). It talks to its parent
over two pipes with length-prefixed JSON. Per job it forks A, which enters a fresh pid + mount
namespace (where available) and forks B, the init of that namespace; A exits at once so B is
re-parented to this worker (a child sub-reaper). B mounts a size-capped tmpfs on its working
directory and a fresh /proc, remounts everything else read-only, drops privileges, sets rlimits,
then runs the program and its tests. Killing B (the namespace's init) kills every process the
program started. The wall-clock timeout is enforced here, outside the namespace.

A pass is reported only by the harness after the last test statement returned, as a JSON line
carrying a per-job random nonce on a randomly numbered fd, and only counts if B then exits 0.
"""

from __future__ import annotations

# Warm the modules programs import most, so each forked child finds them loaded.
import ast  # noqa: E401,F401,I001
import builtins
import ctypes
import json
import os
import resource
import select
import signal
import struct
import sys
import time
import types

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)), "prctl")


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# ---------------------------------------------------------------- inside the job (process B)

DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def _worker_view(cfg: dict, feats: dict, base: str) -> None:
    """Once per worker, in its own mount namespace: every file system read-only, nosuid and nodev,
    except the worker's job folder `base` and a few harmless devices; (root) Python reachable."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if feats.get("root"):
        _expose(cfg.get("expose", []), base)
    mount(base, base, None, MS_BIND)  # its own mount, so it stays writable for the worker
    for dev in DEVICES:
        mount(dev, dev, None, MS_BIND)
    _remount_readonly(keep=(base,) + DEVICES)
    for dev in DEVICES:
        mount(None, dev, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def _job_view(cfg: dict, workdir: str, steps: dict | None = None) -> None:
    """Per job (B, init of a fresh pid + mount namespace): a size-capped tmpfs cwd, a fresh /proc."""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,mode=0777")
    if steps is not None:
        steps["mount"] = True
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    if steps is not None:
        steps["proc"] = True


def _expose(expose: list, workdir: str) -> None:
    """Root only: let the job's uid reach Python's own files below a private directory such as
    /root (mode 700), by covering that directory with a tmpfs holding just those entries."""
    for i, (blocked, names) in enumerate(expose):
        stages = []
        for j, name in enumerate(names):
            stage = os.path.join(workdir, f".stage{i}-{j}")
            src = os.path.join(blocked, name)
            if os.path.isdir(src):
                os.mkdir(stage)
            else:
                open(stage, "w").close()
            mount(src, stage, None, MS_BIND | MS_REC)
            stages.append((stage, name, os.path.isdir(src)))
        mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for stage, name, is_dir in stages:
            dst = os.path.join(blocked, name)
            os.mkdir(dst) if is_dir else open(dst, "w").close()
            mount(stage, dst, None, 8192)  # MS_MOVE
            os.rmdir(stage) if is_dir else os.unlink(stage)


def blocked_paths() -> list:
    """[directory the job's uid cannot traverse, [its entries Python needs]] for Python's paths."""
    out: dict[str, set] = {}
    for path in {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable), *sys.path}:
        if not path or not os.path.isabs(path) or not os.path.exists(path):
            continue
        parts = os.path.realpath(path).split("/")[1:]
        for k in range(len(parts) - 1):
            anc = "/" + "/".join(parts[: k + 1])
            if not os.stat(anc).st_mode & 0o001:
                out.setdefault(anc, set()).add(parts[k + 1])
                break
    return [[d, sorted(n)] for d, n in sorted(out.items())]


def _drop_privileges(cfg: dict, feats: dict) -> None:
    if feats["root"]:
        uid = cfg["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root to an unused uid: every capability is dropped
    elif feats["userns"]:
        # A second, nested user namespace that owns nothing: no capability over our mounts.
        unshare(CLONE_NEWUSER)
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", "0 0 1")
        _write_file("/proc/self/gid_map", "0 0 1")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)


def _confine(cfg: dict, feats: dict, workdir: str) -> None:
    """Make B the sandbox: mounts, privileges, rlimits. Raises if a promised feature fails."""
    os.setsid()
    if feats["mount"]:
        _job_view(cfg, workdir)
    _drop_privileges(cfg, feats)
    os.chdir(workdir)
    cpu = int(cfg["timeout"]) + 1
    mem = cfg["memory_mb"] << 20
    for lim, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                     (resource.RLIMIT_FSIZE, (cfg["file_mb"] << 20,) * 2), (resource.RLIMIT_CORE, (0, 0)),
                     (resource.RLIMIT_NPROC, (cfg["nproc"],) * 2), (resource.RLIMIT_NOFILE, (cfg["nofile"],) * 2)):
        resource.setrlimit(lim, val)


def _remount_readonly(keep: tuple[str, ...]) -> None:
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split()
        target = parts[4].encode().decode("unicode_escape")
        if target in keep or any(target.startswith(k.rstrip("/") + "/") for k in keep if k != "/"):
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
        for opt in parts[5].split(","):  # locked per-mount flags must be kept
            flags |= MOUNT_FLAGS.get(opt, 0)
        try:
            mount(None, target, None, flags)
        except OSError:
            pass  # e.g. a mount hidden under another one; the rest are read-only


def _fail_line(tb, filename: str, source: str) -> str:
    line = ""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            lines = source.splitlines()
            if 0 < tb.tb_lineno <= len(lines):
                line = lines[tb.tb_lineno - 1].strip()
        tb = tb.tb_next
    return line[:500]


def _run_harness(program: str, tests: str, nonce_fd: int, rep_fd: int) -> None:
    """Run program then tests, one test statement at a time, then report.

    Every reference is captured before user code runs. The pass report is inline code, not a
    function user code could find and call, and its nonce is read from a pipe only after the
    last test returned (it is in no Python object while user code runs).
    """
    write, read, exit_, dumps, isinst, settrace, setprofile = os.write, os.read, os._exit, json.dumps, \
        isinstance, sys.settrace, sys.setprofile
    assertion, base_exc, type_, str_ = AssertionError, BaseException, type, str

    def fail(exc: BaseException, where: str, line: str) -> None:  # forging a failure gains nothing
        info = {"outcome": "failed" if isinst(exc, assertion) else "error", "where": where, "line": line}
        try:
            info["error_type"] = str_(type_.__dict__["__name__"].__get__(type_(exc)))[:200]
            info["message"] = str_(exc)[:500]
        except base_exc:  # noqa: BLE001
            info.setdefault("error_type", "Exception")
        write(rep_fd, dumps(info).encode() + b"\n")
        exit_(1)

    try:
        code_p = compile(program, "<program>", "exec")
        stmts = [compile(ast.Module(body=[s], type_ignores=[]), "<tests>", "exec") for s in ast.parse(tests).body]
    except base_exc as exc:  # noqa: BLE001
        fail(exc, "compile", _fail_line(exc.__traceback__, "<program>", program))
    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    g = module.__dict__
    try:
        exec(code_p, g)
    except base_exc as exc:  # noqa: BLE001
        fail(exc, "program", _fail_line(exc.__traceback__, "<program>", program))
    for code in stmts:  # one statement at a time: a tracer cannot jump over a test
        settrace(None)
        setprofile(None)
        try:
            exec(code, g)
        except base_exc as exc:  # noqa: BLE001
            fail(exc, "tests", _fail_line(exc.__traceback__, "<tests>", tests))
    settrace(None)
    setprofile(None)
    write(rep_fd, b'{"outcome": "passed", "nonce": "' + read(nonce_fd, 64) + b'"}\n')
    exit_(0)


def _job_b(job: dict, cfg: dict, feats: dict, workdir: str, nonce_r: int, rep_w: int, out_w: int,
           sync_r: int) -> None:
    rep_fd = rep_w
    try:
        if os.read(sync_r, 1) != b"g":  # the worker says A is reaped and we are its child now
            os._exit(121)
        os.close(sync_r)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the worker dies -> so does the whole job
        # Report and nonce fds: random high numbers; every other fd but 0-2 is closed (before rlimits).
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        hi = min(soft if soft > 0 else 1024, 1 << 16)
        rep_fd, nonce_fd = (64 + int.from_bytes(os.urandom(4), "little") % max(2, hi - 64) for _ in range(2))
        nonce_fd = nonce_fd if nonce_fd != rep_fd else (64 if rep_fd != 64 else 65)
        os.dup2(rep_w, rep_fd, inheritable=False)
        os.dup2(nonce_r, nonce_fd, inheritable=False)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        keep = sorted((rep_fd, nonce_fd))
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, hi)
        _confine(cfg, feats, workdir)
        os.environ.clear()
        os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    except BaseException as exc:  # noqa: BLE001
        os.write(rep_fd, json.dumps({"outcome": "sandbox", "message": repr(exc)}).encode())
        os._exit(3)
    _run_harness(job["program"], job["tests"], nonce_fd, rep_fd)


# ---------------------------------------------------------------- in the worker

def _probe_features(cfg: dict, base: str) -> dict:
    """Which per-job isolation works here: try it in a throwaway child."""
    feats = {"root": os.geteuid() == 0, "userns": False, "net": False, "pid": False, "mount": False,
             "proc": False, "readonly": False}
    flags = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if cfg.get("minimal"):  # QPROBE_SANDBOX_MINIMAL=1: rlimits only (tests the fallback path)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        return _check_readable(cfg, feats)
    try:
        unshare(flags if feats["root"] else flags | CLONE_NEWUSER)
        if not feats["root"]:
            _write_file("/proc/self/setgroups", "deny")
            _write_file("/proc/self/uid_map", f"0 {uid} 1")
            _write_file("/proc/self/gid_map", f"0 {gid} 1")
            feats["userns"] = True
        feats["net"] = True
    except OSError:
        pass
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    if not feats["root"] and not feats["userns"]:
        return _check_readable(cfg, feats)
    probe_dir = os.path.join(base, "probe")
    os.mkdir(probe_dir)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        got = {}
        try:
            unshare(CLONE_NEWPID | CLONE_NEWNS)
            got["pid"] = True
            if os.fork() == 0:
                try:
                    _worker_view(cfg, feats, base)
                    got["readonly"] = True
                    _job_view(cfg, probe_dir, got)
                    _drop_privileges(cfg, feats)
                    open(os.path.join(probe_dir, "x"), "w").close()
                    with open(os.path.join(os.path.dirname(os.__file__), "ast.py")) as f:
                        f.read(1)  # the job's uid can still read Python's own files
                    got["works"] = True
                except OSError:
                    pass
                os.write(w, json.dumps(got).encode())
                os._exit(0)
            os.wait()
        except OSError:
            os.write(w, json.dumps(got).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 4096)
    os.close(r)
    os.waitpid(pid, 0)
    os.rmdir(probe_dir)
    got = json.loads(data) if data else {}
    if got.pop("works", False):
        feats.update(got)
    else:  # a partial setup that breaks Python is worse than none
        feats["pid"] = got.get("pid", False)
    return feats


def _check_readable(cfg: dict, feats: dict) -> dict:
    """Root without a mount namespace: can the job's uid still read Python's files?"""
    if feats["root"]:
        pid = os.fork()
        if pid == 0:
            try:
                _drop_privileges(cfg, feats)
                open(os.path.join(os.path.dirname(os.__file__), "ast.py")).close()
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(1)
        feats["python_unreadable"] = os.waitpid(pid, 0)[1] != 0
    return feats


def level_string(feats: dict) -> str:
    ns = [n for n in ("net", "pid", "mount") if feats[n]]
    if feats["userns"]:
        ns.append("user")
    parts = [f"namespaces({','.join(ns)})"] if ns else []
    if feats["mount"]:
        parts.append("tmpfs-cwd" + ("+proc" if feats["proc"] else "") + ("+ro-root" if feats["readonly"] else ""))
    if feats["root"]:
        # Degraded: the job's uid cannot import modules the worker did not preload.
        parts.append("setuid(python-unreadable)" if feats.get("python_unreadable") else "setuid")
    return "+".join(parts + ["rlimits"])


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
                    _job_b(job, cfg, feats, workdir, nonce_r, rep_w, out_w, sync_r)
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
    deadline = t0 + float(cfg["timeout"])
    out, out_total, rep, timed_out, too_much, status = bytearray(), 0, bytearray(), False, False, None
    early = False
    pidfd = os.pidfd_open(b) if b else None
    open_fds = [fd for fd in (rep_r, out_r) if fd is not None]
    while b:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(open_fds + [pidfd], [], [], left)
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
    return verdict(nonce, rep, status, timed_out, too_much, duration, out.decode("utf-8", "replace"), cfg, early)


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
        cfg["expose"] = blocked_paths() if os.geteuid() == 0 else []
        feats = _probe_features(cfg, base)
        if feats["readonly"]:
            unshare(CLONE_NEWNS)
            _worker_view(cfg, feats, base)
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
