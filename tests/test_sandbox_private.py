"""The job's own root: no program reads a file of the user who runs it or writes outside its tmpfs.

Runs as whoever runs pytest (CI runs it as root and, via .ci/run, as an ordinary user): a private
file and folder in that user's home hold a secret no program may read or leak into the stored
result; canaries name every place a program might write (`..`, the home, the temporary folder,
a world-writable folder, the worker's folder); each case checks its verdict and the host afterwards.
Standard library + pytest + qprobe's sandbox only.
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from qprobe import sandbox

TOKEN = uuid.uuid4().hex
SECRET = "qprobe-private-" + TOKEN


def _confined() -> bool:
    sandbox.isolation_level()
    return sandbox.confined(sandbox._FEATURES)


pytestmark = pytest.mark.skipif(not _confined(), reason="no net+pid+mount isolation here (see test_sandbox_confine)")


@pytest.fixture(autouse=True)
def _opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.ENV_VAR, "1")


def _allowed_top() -> set[str]:
    """What the job's root may hold at its top: the system directories, /dev, /proc, and the first
    component of Python's own places (prefixes, sys.path) and of the temporary folder, wherever
    this machine keeps them (a CI clone or a venv may live anywhere)."""
    import sys

    places = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, tempfile.gettempdir(),
              *(e for e in sys.path if e)]
    tops = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "usr"}
    for p in places:
        for q in {os.path.abspath(p), os.path.realpath(p)}:
            parts = Path(q).parts
            if len(parts) > 1:
                tops.add(parts[1])
    return tops


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    home = Path(os.path.expanduser("~"))
    private = home / f".qprobe-test-private-{TOKEN}"
    private_dir = home / f".qprobe-test-keys-{TOKEN}"
    shared = tmp_path_factory.mktemp("shared")
    os.chmod(shared, 0o777)  # world-writable: only the mount view can keep a program out
    made = []
    try:
        private.write_text(SECRET)
        made.append(private)
        os.chmod(private, 0o600)
        private_dir.mkdir(mode=0o700)
        made.append(private_dir)
        (private_dir / "id_key").write_text(SECRET)
        ctx = {"allowed_top": repr(_allowed_top()), "home": str(home), "private": str(private), "private_dir": str(private_dir), "token": TOKEN,
               "shared": str(shared), "tmp": tempfile.gettempdir(), "secret": SECRET}
        pairs = {name: (textwrap.dedent(prog).format(**ctx), textwrap.dedent(tests).format(**ctx))
                 for name, (prog, tests) in CASES.items()}
        os.environ[sandbox.ENV_VAR] = "1"  # module scope: before the per-test opt-in fixture
        sandbox.clear_cache()
        results = dict(zip(pairs, sandbox.check_many(list(pairs.values()), timeout=3.0, workers=3), strict=True))
        yield {**ctx, "results": results, "home_path": home, "shared_path": shared}
    finally:
        for p in (private_dir / "id_key", *reversed(made)):
            if p.is_dir():
                p.rmdir()
            elif p.exists():
                p.unlink()
        for p in _canaries(home, shared):
            if p.exists():
                p.unlink()


def _canaries(home: Path, shared: Path) -> list[Path]:
    tmp = Path(tempfile.gettempdir())
    return [home / f"canary-{TOKEN}", shared / f"canary-{TOKEN}", tmp / f"canary-{TOKEN}",
            Path("/tmp") / f"canary-{TOKEN}", *[d / f"canary-{TOKEN}" for d in tmp.glob("qprobe-sandbox-*")]]


# name -> (program, tests); {placeholders} from the fixture's ctx, literal braces doubled.
CASES = {
    # Every road to the private file: by path, through /proc, by listing the home, by walking up.
    "read_private_file": ("""
        import glob, os
        found = []
        for path in ['{private}', '{private_dir}/id_key', '/proc/1/root{private}', '/proc/self/root{private}',
                     '/proc/self/cwd/../../../..{private}', '/dev/fd/../../..{private}']:
            try:
                found.append(open(path).read())
            except OSError:
                pass
        for pattern in ['{home}/.*', '{home}/*', '/home/*/.*', '/root/.*', '/*/.qprobe-test-*', '/*/*/.qprobe-test-*']:
            for path in glob.glob(pattern):
                try:
                    found.append(open(path).read())
                except OSError:
                    pass
        """, "assert '{token}' not in str(found), found"),
    # A program that tries to leak what it reads through everything stored: output, message, line.
    "leak_private_file": ("""
        import sys
        data = ''
        for path in ['{private}', '{private_dir}/id_key']:
            try:
                data += open(path).read()
            except OSError as exc:
                data += repr(exc)
        print(data)
        print(data, file=sys.stderr)
        """, "assert False, data"),
    "home_not_visible": ("""
        import os
        seen = os.listdir('{home}') if os.path.isdir('{home}') else []
        """, "assert not [n for n in seen if '{token}' in n], seen"),
    # Writes: every place outside the job's tmpfs fails; `..` is still the job's tmpfs.
    "write_everywhere": ("""
        import os
        ok = []
        for d in ['{home}', '{shared}', '{tmp}', '/tmp', '/', '/usr', '/etc', '/dev', '/proc', '..', '../..', '/dev/shm']:
            try:
                with open(os.path.join(d, 'canary-{token}'), 'w') as f:
                    f.write('x')
                ok.append(os.path.realpath(d))
            except OSError:
                pass
        here = os.path.realpath('..')
        """, "assert all(p == here or p.startswith(here + '/') for p in ok), (ok, here)"),
    # The tests run in another process (they never see the job's files): the program looks itself.
    "dotdot_write_is_contained": ("open('../canary-{token}', 'w').write('x')\nimport os\n"
                                   "def wrote():\n    return os.path.exists('../canary-{token}')",
                                   "assert wrote()"),
    "root_is_small": ("""
        import os
        top = sorted(os.listdir('/'))
        """, "assert set(top) <= {allowed_top}, top\nassert 'sys' not in top"),
    "python_still_works": ("""
        import collections, decimal, fractions, heapq, json, math, re, itertools, functools, sqlite3, subprocess
        out = subprocess.run(['ls', '/'], capture_output=True, text=True).stdout
        """, "assert 'usr' in out and math.gcd(12, 18) == 6"),
}


def test_private_file_unread_and_unleaked(host):
    r = host["results"]
    assert r["read_private_file"].passed, r["read_private_file"]
    assert r["home_not_visible"].passed, r["home_not_visible"]
    leak = r["leak_private_file"]
    assert leak.status == "failed" and ("No such file" in leak.message or "Permission" in leak.message), leak
    for name, res in r.items():
        assert SECRET not in json.dumps(res.details()), name  # nothing stored carries the secret


def test_no_write_outside_the_jobs_tmpfs(host):
    r = host["results"]
    assert r["write_everywhere"].passed, r["write_everywhere"]
    assert r["dotdot_write_is_contained"].passed, r["dotdot_write_is_contained"]
    left = [str(p) for p in _canaries(host["home_path"], host["shared_path"]) if p.exists()]
    assert left == []
    assert sorted(p.name for p in host["shared_path"].iterdir()) == []


def test_own_root_keeps_python_working(host):
    assert host["results"]["root_is_small"].passed, host["results"]["root_is_small"]
    assert host["results"]["python_still_works"].passed, host["results"]["python_still_works"]


def test_stored_text_is_capped(host):
    r = sandbox.check("import sys\nprint('y' * 100000)\nraise ValueError('z' * 100000)", "pass")
    assert r.status == "error" and r.error_type == "ValueError"
    assert len(r.stderr_tail) <= sandbox.Limits().tail_bytes and len(r.message) <= 500
