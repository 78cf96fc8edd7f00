"""How one sandboxed job is confined: Linux system calls through ctypes, the job's own root file
system, and inside the job (process B, init of its own pid + mount namespace) the mounts, privilege
drop, cgroup and rlimits; and the one-time probe of which of these work here.

The jobs' root (`worker_view`, once per worker, in the worker's own mount namespace) is an empty
tmpfs holding read-only bind mounts of the system's program and library directories (/usr, /bin,
/sbin, /lib*, /etc), of Python's own directories (its prefixes: interpreter, standard library,
the virtual environment's site-packages) and of a few devices (/dev/null, /dev/zero, /dev/full,
/dev/random, /dev/urandom). Nothing else of the host is in it: no home directory, no /tmp, no /root,
no /sys. Per job (`_job_view`) B mounts a size-capped tmpfs on the worker's job folder inside that
root (the job's cwd, HOME and TMPDIR, and its `..`), a fresh /proc of its pid namespace, then
pivot_root()s into the root and detaches the old one. Then it gives up every privilege: as root a
setuid to an unused uid, as an ordinary user (user namespaces) a nested user namespace that owns
nothing. A step that fails raises, so a job never runs below the level its worker reported.
What runs inside the job (program, tests, verdict) is `_sandbox_harness.py`.

Loaded by `_sandbox_worker.py` (by path: the worker runs as `python -I`, which puts no directory on
sys.path); standard library only, nothing from qprobe.
"""

from __future__ import annotations

# Warm the modules programs import most, so each forked child finds them loaded.
import ast  # noqa: E401,F401,I001
import ctypes
import importlib.util
import json
import os
import platform
import resource
import sys
import time
import types

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MS_STRICTATIME, MNT_DETACH = 1 << 24, 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}

_libc = ctypes.CDLL(None, use_errno=True)


def _load_sibling(name: str) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


cgroup = _load_sibling("_sandbox_cgroup")
CG = None  # this worker's cgroups (`cgroup.Cgroups`), set by probe_features; None: rlimits only
_VIEW: dict = {}  # set by worker_view: the jobs' root and the job folder inside it (forked jobs inherit it)


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


def pivot_root(new: str, old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(38, f"pivot_root: no system call number known for {platform.machine()}")
    _check(_libc.syscall(ctypes.c_long(number), new.encode(), old.encode()), "pivot_root")


def prctl(option: int, arg: int) -> None:
    if not hasattr(_libc, "prctl"):  # not Linux: nothing to set (such a worker runs unconfined)
        return
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)), "prctl")


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def start_meter(cfg: dict, feats: dict):
    """Per job, in the worker before the fork: the job's cgroup limits, and its CPU clock
    (`cgroup.Meter`; `watch` the job's pids, which the /proc clock needs)."""
    if CG is not None:
        CG.limit(cfg["memory_mb"] << 20, cfg["nproc"])
    return cgroup.Meter(CG, orphans=not feats.get("pid"))  # no pid namespace: orphans come to us


# ---------------------------------------------------------------- the jobs' root (once per worker)


def python_dirs() -> list[str]:
    """Python's own directories: its prefixes, or (a prefix that holds the home directory) the
    sys.path entries below it; none under a system directory, none below another."""
    home = os.path.realpath(os.path.expanduser("~")) if "HOME" in os.environ else ""
    try:
        import pwd

        home = home or os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        pass
    found: set[str] = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        for p in {os.path.abspath(prefix), os.path.realpath(prefix)}:
            if p == "/" or (home and (home + "/").startswith(p.rstrip("/") + "/")):
                found.update(os.path.abspath(e) for e in sys.path if e and os.path.isdir(e) and
                             os.path.realpath(e).startswith(p.rstrip("/") + "/"))
            elif os.path.isdir(p):
                found.add(p)
    out: list[str] = []
    for p in sorted(found):
        if not any(p == d or p.startswith(d + "/") for d in (*SYSTEM_DIRS, *out)):
            out.append(p)
    return out


def _bind(src: str, target: str) -> None:
    if os.path.isdir(src):
        os.makedirs(target, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        open(target, "a").close()
    mount(src, target, None, MS_BIND | MS_REC)


def _readonly_below(root: str) -> None:
    """Remount every mount at or below `root` read-only, nosuid and (but the devices) nodev,
    keeping the flags a user namespace may not clear. A failure raises."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split()
        target = parts[4].encode().decode("unicode_escape")
        if target != root and not target.startswith(root + "/"):
            continue
        opts = parts[5].split(",")
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
        flags |= 0 if target[len(root):] in DEVICES else MS_NODEV
        for opt in opts:
            flags |= MOUNT_FLAGS.get(opt, 0)
        if "noatime" not in opts and "relatime" not in opts:
            flags |= MS_STRICTATIME
        mount(None, target, None, flags)


def worker_view(cfg: dict, feats: dict, base: str) -> None:
    """Once per worker, in its own mount namespace: build the jobs' root at `base/root`."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = os.path.join(base, "root")
    os.makedirs(root, exist_ok=True)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    mask = os.umask(0o022)
    try:
        for src in SYSTEM_DIRS:
            if os.path.islink(src):
                os.symlink(os.readlink(src), root + src)
            elif os.path.isdir(src):
                _bind(src, root + src)
        for path in python_dirs():
            _bind(os.path.realpath(path), root + path)
        os.mkdir(root + "/dev", 0o755)
        for dev in DEVICES:
            if os.path.exists(dev):
                open(root + dev, "w").close()
                mount(dev, root + dev, None, MS_BIND)
        for name, target in DEV_LINKS.items():
            os.symlink(target, f"{root}/dev/{name}")
        os.symlink(base, root + "/dev/shm")  # POSIX shared memory and semaphores: the job's own tmpfs
        os.mkdir(root + "/proc", 0o555)
        os.makedirs(root + base, 0o755)  # the job's tmpfs goes here
    finally:
        os.umask(mask)
    _readonly_below(root)
    _VIEW.update(root=root, base=base)


# ---------------------------------------------------------------- inside the job (process B)


def _job_view(cfg: dict, feats: dict, workdir: str, steps: dict | None = None) -> None:
    """Per job (B, init of a fresh pid + mount namespace): a size-capped tmpfs on the job folder, a
    fresh /proc, then the jobs' root becomes B's root and the host's file systems are detached."""
    root, base = _VIEW["root"], _VIEW["base"]
    mount("tmpfs", root + base, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,mode=0777")
    os.makedirs(root + workdir, 0o777, exist_ok=True)
    os.chmod(root + workdir, 0o777)
    if steps is not None:
        steps["mount"] = True
    # rw only in a user namespace, where the nested user namespace's maps are written through it.
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | (0 if feats["userns"] else MS_RDONLY))
    if steps is not None:
        steps["proc"] = True
    os.chdir(root)
    pivot_root(".", ".")
    _check(_libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "umount the host's root")
    os.chdir("/")
    if steps is not None:
        steps["readonly"] = True


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
    """Make B the sandbox: cgroup, IPC namespace, mounts, privileges, rlimits. Raises if a promised
    step fails."""
    os.setsid()
    # The OOM killer's first choice, before the worker (which shares its cgroup) or any host process.
    _write_file("/proc/self/oom_score_adj", "1000")
    if feats.get("ipc"):
        unshare(CLONE_NEWIPC)  # per job: no System V queue or semaphore outlives it or is shared
    if feats["mount"]:
        _job_view(cfg, feats, workdir)
    _drop_privileges(cfg, feats)
    os.chdir(workdir)
    cpu = int(cfg["timeout"]) + 1  # per process; the job's total is judged by the worker's CPU clock
    mem = cfg["memory_mb"] << 20
    for lim, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                     (resource.RLIMIT_FSIZE, (cfg["file_mb"] << 20,) * 2), (resource.RLIMIT_CORE, (0, 0)),
                     (resource.RLIMIT_NPROC, (cfg["nproc"],) * 2), (resource.RLIMIT_NOFILE, (cfg["nofile"],) * 2)):
        resource.setrlimit(lim, val)




# ---------------------------------------------------------------- what works here (once per worker)

def probe_features(cfg: dict, base: str) -> dict:
    """Which per-job isolation works here: try every step of it in a throwaway child. Also makes
    this worker's cgroups where it may (`CG`). feats["why"] says what failed, for the error."""
    global CG
    feats = {"root": os.geteuid() == 0, "userns": False, "net": False, "ipc": False, "pid": False,
             "mount": False, "proc": False, "readonly": False, "cgroup": "", "cgroup_dirs": [], "cpu_clock": "proc", "why": ""}
    if not sys.platform.startswith("linux"):
        feats["why"] = f"{sys.platform} has no Linux namespaces"
        return feats
    CG = cgroup.discover(f"qprobe-{os.getpid()}-{os.urandom(3).hex()}")
    if CG is not None:
        feats["cgroup"], feats["cgroup_dirs"] = CG.describe(), list(CG.tops.values())
        feats["cpu_clock"] = "cgroup" if CG.cpu else "proc"
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    if cfg.get("minimal"):  # QPROBE_SANDBOX_MINIMAL=1: no namespaces (tests the fallback path)
        feats["why"] = "QPROBE_SANDBOX_MINIMAL=1 turned the namespaces off"
        return _check_readable(cfg, feats)
    uid, gid = os.getuid(), os.getgid()
    try:
        unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | (0 if feats["root"] else CLONE_NEWUSER))
        if not feats["root"]:
            _write_file("/proc/self/setgroups", "deny")
            _write_file("/proc/self/uid_map", f"0 {uid} 1")
            _write_file("/proc/self/gid_map", f"0 {gid} 1")
            feats["userns"] = True
        feats["net"] = feats["ipc"] = True
    except OSError as exc:
        feats["why"] = f"{'' if feats['root'] else 'user '}namespaces are not allowed here ({exc})"
        return _check_readable(cfg, feats)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        got: dict = {}
        try:
            unshare(CLONE_NEWPID | CLONE_NEWNS)
            got["pid"] = True
            if os.fork() == 0:
                try:
                    worker_view(cfg, feats, base)
                    probe = os.path.join(base, "probe")
                    _job_view(cfg, feats, probe, got)
                    _drop_privileges(cfg, feats)
                    open(os.path.join(probe, "x"), "w").close()
                    with open(os.path.join(os.path.dirname(os.__file__), "ast.py")) as f:
                        f.read(1)  # the job's uid can still read Python's own files
                    got["works"] = True
                except OSError as exc:
                    got["why"] = f"a mount namespace step failed ({exc})"
                os.write(w, json.dumps(got).encode())
                os._exit(0)
            os.wait()
        except OSError as exc:
            os.write(w, json.dumps({**got, "why": f"a pid + mount namespace is not allowed here ({exc})"}).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 65536)
    os.close(r)
    os.waitpid(pid, 0)
    got = json.loads(data) if data else {"why": "the probe of the mount namespace died"}
    if got.pop("works", False):
        feats.update(got)
    else:  # a partial setup that breaks Python is worse than none
        feats["pid"], feats["why"] = got.get("pid", False), got.get("why", "")
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


def fork() -> int:
    """os.fork, waiting out a full pids cgroup: a killed job's processes still count against
    pids.max while the kernel tears them down (a fork bomb's take a few milliseconds)."""
    for _ in range(400):
        try:
            return os.fork()
        except BlockingIOError:
            time.sleep(0.005)
    return os.fork()
