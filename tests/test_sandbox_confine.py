"""Confinement: cgroups (fake v1 / v2 trees and the real one where writable), the job's CPU clock,
failing closed below net+pid+mount isolation, and one-line errors when the sandbox cannot start.

Standard library + pytest + qprobe's sandbox modules only: CI also runs this file as an ordinary user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qprobe import _sandbox_cgroup as cgroup
from qprobe import _sandbox_pool, sandbox
from qprobe.errors import CodeExecutionNotAllowed, QProbeError, SandboxError, UnconfinedSandbox

SRC = str(Path(sandbox.__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def _opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.ENV_VAR, "1")


# ------------------------------------------------------------------ fake cgroup trees


def _v1_tree(tmp: Path) -> tuple[str, str]:
    """A temp dir laid out like this machine's v1 hierarchies; (mountinfo, /proc/self/cgroup) texts."""
    lines = []
    for i, ctl in enumerate(("cpu,cpuacct", "memory", "pids", "devices")):
        d = tmp / ctl / "job.slice"
        d.mkdir(parents=True)
        lines.append(f"{30 + i} 25 0:{40 + i} / {tmp / ctl} rw,nosuid - cgroup cgroup rw,{ctl}")
    mountinfo = "\n".join(["25 1 0:20 / /sys rw - sysfs sysfs rw", *lines, f"40 25 0:50 / {tmp}/unified rw - cgroup2 cgroup2 rw"])
    proc = "5:memory:/job.slice\n4:pids:/job.slice\n3:cpu,cpuacct:/job.slice\n2:devices:/job.slice\n0::/\n"
    return mountinfo, proc


def test_locate_v1_and_v2():
    v1 = (
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    proc = "9:pids:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/a b\n0::/\n"
    assert cgroup.locate(v1, proc) == {"v1": {"memory": "/sys/fs/cgroup/memory/process_api/abc",
                                              "pids": "/sys/fs/cgroup/pids", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct/a b"}}
    v2 = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    assert cgroup.locate(v2, "0::/user.slice/user-1000.slice/session-2.scope\n") == \
        {"v2": "/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope"}
    # a cgroup namespace: the mount's root is the namespace's cgroup, paths are relative to it
    ns = "30 1 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert cgroup.locate(ns, "0::/docker/abc/sub\n") == {"v2": "/sys/fs/cgroup/sub"}
    assert cgroup.locate(v2, "") == {} and cgroup.locate("", "0::/\n") == {}
    # v1 without pids: the (hybrid) v2 hierarchy is the candidate; `setup` then finds no controllers there
    assert cgroup.locate(v1.replace("rw,pids", "rw,freezer"), proc) == {"v2": "/sys/fs/cgroup/unified"}


def _kernel_files(d: Path, **files: str) -> None:
    """What the kernel puts in a new cgroup directory (a fake tree must lay it out itself)."""
    d.mkdir(parents=True, exist_ok=True)
    for name, text in {"cgroup.procs": "", **files}.items():
        (d / name.replace("_", ".", 1)).write_text(text)


def test_fake_v1_tree(tmp_path):
    mountinfo, proc = _v1_tree(tmp_path)
    found = cgroup.locate(mountinfo, proc)
    assert found == {"v1": {c: str(tmp_path / d / "job.slice") for c, d in
                            (("memory", "memory"), ("pids", "pids"), ("cpuacct", "cpu,cpuacct"))}}
    # no cpuacct.usage in the new cgroup: memory and pids still limited, the CPU clock reads /proc
    bare = cgroup.setup(found, "qprobe-bare")
    assert bare is not None and not bare.cpu and bare.describe() == "cgroup-v1(memory,pids)"
    assert cgroup.Meter(bare).source == "proc"
    _kernel_files(tmp_path / "cpu,cpuacct/job.slice/qprobe-w", cpuacct_usage="0\n")
    cg = cgroup.setup(found, "qprobe-w")
    assert cg is not None and cg.describe() == "cgroup-v1(memory,pids,cpuacct)" and cg.cpu
    dirs = {c: Path(d) for c, d in cg.tops.items()}
    mem, pids, acct = dirs["memory"], dirs["pids"], dirs["cpuacct"]
    assert all((d / "cgroup.procs").read_text() == "0" for d in dirs.values())  # the worker moved in
    cg.limit(300 << 20, 17)
    assert (mem / "memory.limit_in_bytes").read_text() == str(300 << 20)
    assert (pids / "pids.max").read_text() == "19"  # + the worker and the job's intermediate process
    (pids / "pids.max").write_text("untouched")
    cg.limit(300 << 20, 17)  # unchanged limits are not rewritten
    assert (pids / "pids.max").read_text() == "untouched"
    cg.limit(300 << 20, 9)
    assert (pids / "pids.max").read_text() == "11"
    (acct / "cpuacct.usage").write_text("1500000000\n")
    meter = cgroup.Meter(cg)
    (acct / "cpuacct.usage").write_text("4000000000\n")  # 2.5 s of CPU time since the job started
    assert meter.cpu() == pytest.approx(2.5) and meter.over(2.0) and not meter.over(3.0)
    assert meter.report("cpu", 2.0)["clock"] == "cpu(cgroup)"


def test_fake_v2_tree(tmp_path):
    parent = tmp_path / "user.slice"
    _kernel_files(parent, cgroup_subtree_control="")
    _kernel_files(parent / "qprobe-w", cpu_stat="usage_usec 0\n", **{"memory.swap.max": "max"})
    mountinfo = f"30 1 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    cg = cgroup.setup(cgroup.locate(mountinfo, "0::/user.slice\n"), "qprobe-w")
    assert cg is not None and cg.describe() == "cgroup-v2(memory,pids,cpu)"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids"
    d = parent / "qprobe-w"
    assert (d / "cgroup.procs").read_text() == "0"
    cg.limit(1 << 30, 64)
    assert (d / "memory.max").read_text() == str(1 << 30) and (d / "pids.max").read_text() == "66"
    assert (d / "memory.swap.max").read_text() == "0"
    (d / "cpu.stat").write_text("usage_usec 250000\nuser_usec 200000\n")
    meter = cgroup.Meter(cg)
    (d / "cpu.stat").write_text("usage_usec 1250000\nuser_usec 900000\n")
    assert meter.cpu() == pytest.approx(1.0)


def test_unwritable_trees_give_none(tmp_path):
    # v2 whose parent cannot enable controllers for children (the kernel answers EBUSY when the
    # parent holds processes): here cgroup.subtree_control is a directory, so the write fails.
    parent = tmp_path / "busy"
    (parent / "cgroup.subtree_control").mkdir(parents=True)
    assert cgroup.setup({"v2": str(parent)}, "qprobe-w") is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cgroup.setup({"v1": {"memory": str(blocker), "pids": str(blocker)}}, "qprobe-w") is None
    assert cgroup.setup({}, "qprobe-w") is None
    assert not (parent / "qprobe-w").exists()


def test_tree_cpu_counts_children_and_reaped_ones():
    code = textwrap.dedent("""
        import os, sys, time
        def burn(s):
            t = time.process_time()
            while time.process_time() - t < s:
                pass
        pid = os.fork()
        if pid == 0:
            burn(0.3)
            os._exit(0)
        os.waitpid(pid, 0)              # reaped: in our cutime
        if os.fork() == 0:
            burn(0.3)
            sys.stdout.write("child\\n"); sys.stdout.flush()
            time.sleep(30)              # alive: counted through /proc/<pid>/task/*/children
        burn(0.2)
        sys.stdout.write("parent\\n"); sys.stdout.flush()
        time.sleep(30)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert sorted([proc.stdout.readline(), proc.stdout.readline()]) == ["child\n", "parent\n"]
        assert 0.7 <= cgroup.tree_cpu([proc.pid]) < 2.0
        meter = cgroup.Meter()
        meter.watch(proc.pid, None)
        assert meter.cpu() >= 0.7 and meter.report("", 3.0)["clock"] == "cpu(proc)"
    finally:
        for child in cgroup._children(proc.pid):
            os.kill(child, 9)
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ the real sandbox


def test_cpu_limit_counts_every_process_of_the_job():
    # Two processes of 0.7 s CPU each: neither reaches 1 s, the job does (1.4 s); on 2 cores the wall
    # clock stays near 0.7 s. A per-process limit or a wall clock alone would let it pass.
    prog = textwrap.dedent("""
        import os, time
        def burn(s):
            t = time.process_time()
            while time.process_time() - t < s:
                pass
        kid = os.fork()
        burn(0.7)
        if kid == 0:
            os._exit(0)
        os.waitpid(kid, 0)
        """)
    r = sandbox.check(prog, "pass", timeout=1.0)
    assert r.status == "timeout" and r.extra["limit_hit"] == "cpu", r
    assert r.extra["cpu_time"] >= 1.0 and r.extra["retried"]
    ok = sandbox.check(prog, "pass", timeout=3.0)
    assert ok.passed and 1.2 <= ok.extra["cpu_time"] < 3.0, ok
    assert ok.extra["clock"] in ("cpu(cgroup)", "cpu(proc)")


def test_sleeping_job_hits_the_wall_clock_backstop():
    r = sandbox.check("import time\ntime.sleep(60)", "pass", timeout=0.25)
    assert r.status == "timeout" and r.extra["limit_hit"] == "wall", r
    assert cgroup.backstop(0.25) - 0.1 < r.duration < cgroup.backstop(0.25) + 2
    assert "backstop" in r.message and r.extra["cpu_time"] < 0.25


def test_real_cgroup_limits_where_writable():
    level = sandbox.isolation_level()
    if "cgroup-" not in level:
        pytest.skip(f"no writable cgroup here ({level}): memory and processes are limited by rlimits")
    limits = sandbox.Limits(memory_mb=300, nproc=17)
    r = sandbox.check("x = 1", "assert x == 1", limits=limits)
    assert r.passed and r.extra["clock"] == "cpu(cgroup)"
    tops = [Path(d) for w in sandbox._POOL.idle for d in w.features.get("cgroup_dirs", [])]
    values = {p.read_text().strip() for t in tops for p in t.iterdir()
              if p.name in ("pids.max", "memory.limit_in_bytes", "memory.max")}
    assert {"19", str(300 << 20)} <= values
    # Memory is limited for the whole job: 3 processes of 150 MiB each stay under the 300 MiB
    # address-space rlimit one by one, but not under the 300 MiB cgroup together.
    prog = textwrap.dedent("""
        import os, time
        kids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                block = b"x" * (150 << 20)
                time.sleep(0.5)
                os._exit(0)
            kids.append(pid)
        codes = [os.waitpid(k, 0)[1] for k in kids]
        """)
    small = sandbox.check(prog, "assert codes == [0, 0, 0], codes", limits=limits, timeout=5)
    big = sandbox.check(prog, "assert codes == [0, 0, 0], codes", limits=sandbox.Limits(memory_mb=1024), timeout=5)
    assert small.status == "failed" and "9" in small.message, small  # SIGKILLed by the OOM killer
    assert big.passed, big
    assert all(w.alive() for w in sandbox._POOL.idle)  # the OOM killer took the job's processes only


def test_level_string_says_what_is_in_effect():
    level = sandbox.isolation_level()
    feats = sandbox._FEATURES
    assert level.endswith("+rlimits") and "cpu-clock(" in level
    if sandbox.confined(feats):
        assert level.startswith("namespaces(net,pid,mount") and "own-ro-root" in level
        assert ("setuid" in level) == (os.geteuid() == 0) and ("user" in level.split(")")[0]) == (os.geteuid() != 0)
    else:
        assert level.startswith("UNCONFINED(")


def _run_isolated(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter (its own worker pool) with only these environment variables set."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": SRC, "HOME": os.environ.get("HOME", "/")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**base, **env})


REFUSAL = """
from qprobe import sandbox
from qprobe.errors import UnconfinedSandbox
try:
    sandbox.check("x = 1", "assert x == 1")
    print("RAN")
except UnconfinedSandbox as exc:
    print("REFUSED " + str(exc))
"""


def test_no_namespaces_refuses_without_the_second_opt_in():
    out = _run_isolated(REFUSAL, QPROBE_ALLOW_CODE_EXECUTION="1", QPROBE_SANDBOX_MINIMAL="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("REFUSED ") and out.stdout.count("\n") == 1, out.stdout
    msg = out.stdout
    for part in ("expected net+pid+mount isolation", "UNCONFINED(no net,pid,mount namespaces)",
                 "missing: net, pid, mount", "QPROBE_SANDBOX_MINIMAL=1", "--allow-unconfined",
                 "QPROBE_ALLOW_UNCONFINED=1"):
        assert part in msg, (part, msg)
    assert "unset QPROBE_SANDBOX_MINIMAL" in msg
    assert issubclass(UnconfinedSandbox, CodeExecutionNotAllowed) and issubclass(UnconfinedSandbox, QProbeError)


def test_refusal_says_how_to_get_namespaces_on_each_platform():
    root = sandbox._how_to_confine({"root": True, "why": "namespaces are not allowed here (unshare: EPERM)"}, "linux")
    assert "--privileged" in root and "seccomp=unconfined" in root
    user = sandbox._how_to_confine({"root": False, "why": "user namespaces are not allowed here"}, "linux")
    for part in ("kernel.unprivileged_userns_clone=1", "user.max_user_namespaces", "seccomp=unconfined",
                 "kernel.apparmor_restrict_unprivileged_userns=0"):
        assert part in user, part
    mac = sandbox._how_to_confine({"root": False, "why": "darwin has no Linux namespaces"}, "darwin")
    assert mac.startswith("on darwin there are no Linux namespaces") and "second opt-in" in mac


def test_no_namespaces_runs_with_the_second_opt_in_and_says_so():
    code = REFUSAL + "print(sandbox.isolation_level())\n"
    out = _run_isolated(code, QPROBE_ALLOW_CODE_EXECUTION="1", QPROBE_SANDBOX_MINIMAL="1", QPROBE_ALLOW_UNCONFINED="1")
    assert out.returncode == 0, out.stderr
    ran, level = out.stdout.splitlines()
    assert ran == "RAN" and level.startswith("UNCONFINED(no net,pid,mount namespaces)+") and level.endswith("rlimits")
    assert "own-ro-root" not in level and "namespaces(" not in level


def test_require_opt_in_checks_confinement_too():
    out = _run_isolated("from qprobe import sandbox\nsandbox.require_opt_in()\n",
                        QPROBE_ALLOW_CODE_EXECUTION="1", QPROBE_SANDBOX_MINIMAL="1")
    assert out.returncode == 1 and "UnconfinedSandbox: expected net+pid+mount isolation" in out.stderr


def test_cli_has_the_second_opt_in():
    for cmd in ("collect", "demo"):
        out = _run_isolated(f"from qprobe.cli.main import main\nmain(['{cmd}', '--help'])")
        if "No module named" in out.stderr:
            pytest.skip("the CLI's dependencies are not installed here")
        assert "--allow-unconfined" in out.stdout, out.stdout + out.stderr


def test_worker_that_fails_to_start_is_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "worker.py"
    broken.write_text("import sys\nsys.stderr.write('cannot set up the view: EPERM\\n')\nsys.exit(1)\n")
    monkeypatch.setattr(_sandbox_pool, "WORKER_SCRIPT", broken)
    with pytest.raises(SandboxError) as info:
        sandbox._Worker(990)
    assert "cannot set up the view: EPERM" in str(info.value) and "\n" not in str(info.value)
    # and one that answers with an error of its own (what _sandbox_worker does when set-up raises)
    answers = tmp_path / "answers.py"
    answers.write_text("import json, os, struct\nd = json.dumps({'error': 'OSError: mount /x: denied'}).encode()\n"
                       "os.write(1, struct.pack('<I', len(d)) + d)\n")
    monkeypatch.setattr(_sandbox_pool, "WORKER_SCRIPT", answers)
    with pytest.raises(SandboxError, match="got: OSError: mount /x: denied; "):
        sandbox._Worker(991)


def test_results_record_the_clock():
    r = sandbox.check("def f():\n    return 1", "assert f() == 1")
    d = r.details()
    assert r.passed and d["clock"] in ("cpu(cgroup)", "cpu(proc)") and 0 <= d["cpu_time"] < 1
    assert json.loads(json.dumps(d)) == d and "limit_hit" not in d


READONLY = """
import os, sys
from qprobe import _sandbox_confine as c
if os.geteuid() != 0:  # an ordinary user: a user namespace of our own, as the worker makes
    uid, gid = os.getuid(), os.getgid()
    c.unshare(c.CLONE_NEWUSER | c.CLONE_NEWNS)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        c._write_file(f"/proc/self/{name}", text)
else:
    c.unshare(c.CLONE_NEWNS)
c.mount(None, "/", None, c.MS_REC | c.MS_PRIVATE)
d = os.environ["D"]
c.mount("tmpfs", d, "tmpfs", 0, "size=1m")
os.mkdir(d + "/sub")
c.mount("tmpfs", d + "/sub", "tmpfs", 0, "size=1m")
if sys.argv[1] == "fail":  # one remount refused, as a locked flag or a busy mount would be
    real = c.mount
    def mount(src, target, fstype, flags, data=None):
        if target.endswith("/sub") and flags & c.MS_REMOUNT:
            raise OSError(1, f"mount {target}: Operation not permitted")
        return real(src, target, fstype, flags, data)
    c.mount = mount
try:
    c._readonly_below(d)
except OSError as exc:
    print("RAISED", exc)
    sys.exit(0)
for path in (d + "/x", d + "/sub/x"):
    try:
        open(path, "w")
        print("WRITABLE", path)
    except OSError as exc:
        print("READONLY" if exc.errno == 30 else f"OTHER {exc}")
"""


def test_a_remount_that_fails_is_an_error_not_a_lower_level(tmp_path):
    ok = _run_isolated(READONLY.replace("sys.argv[1]", "'ok'"), D=str(tmp_path))
    if "Operation not permitted" in ok.stderr and "unshare" in ok.stderr:
        pytest.skip("no mount namespace for this user here")
    assert ok.returncode == 0 and ok.stdout.split() == ["READONLY", "READONLY"], ok.stdout + ok.stderr
    bad = _run_isolated(READONLY.replace("sys.argv[1]", "'fail'"), D=str(tmp_path))
    assert bad.returncode == 0 and bad.stdout.startswith("RAISED ") and "/sub: Operation not permitted" in bad.stdout, \
        bad.stdout + bad.stderr
