"""How one sandboxed job is confined and run: Linux system calls through ctypes, the worker's
read-only view of the file system, and inside the job (process B, init of its own pid + mount
namespace) the mounts, privilege drop and rlimits. Also the one-time probe of
which of these work on this machine. What runs inside the job (program, tests, verdict) is
`_sandbox_harness.py`.

Loaded by `_sandbox_worker.py` (by path: the worker runs as `python -I`, which puts no directory on
sys.path); standard library only, nothing from qprobe.
"""

from __future__ import annotations

# Warm the modules programs import most, so each forked child finds them loaded.
import ast  # noqa: E401,F401,I001
import ctypes
import json
import os
import resource
import sys

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


def worker_view(cfg: dict, feats: dict, base: str) -> None:
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


# ---------------------------------------------------------------- what works here (once per worker)

def probe_features(cfg: dict, base: str) -> dict:
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
                    worker_view(cfg, feats, base)
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
