#!/usr/bin/env bash
# The sandbox's tests as an ordinary user (user namespaces instead of root); .ci/run calls it after
# the README's test command. Needs root (it makes the user); as anyone else it has nothing to do.
#
# The interpreter CI installs into may live where other users cannot enter (e.g. /root/.pyenv), so
# the user gets its own: a venv of the system's python3 with pytest from PyPI, in a world-readable
# folder, with a copy of src/ and tests/. The tests put a private file in that user's home and
# canaries in its home, its temporary folder and `..`, and check that no program reads or leaks the
# file or leaves a canary; the hostile suite checks verdicts and the host.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "CI: not root, so the test run before this one was already an ordinary user's"; exit 0
fi
user=qprobe-ci
id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
home=$(getent passwd "$user" | cut -d: -f6)
stage=$(mktemp -d /var/tmp/qprobe-ci.XXXXXX)
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"
if ! /usr/bin/python3 -m venv "$stage/venv" 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$stage/venv" && /usr/bin/python3 -m venv "$stage/venv"
fi
"$stage/venv/bin/pip" install --quiet pytest
cp -r src tests "$stage/"
mkdir "$stage/tmp"
chown "$user" "$stage/tmp"
chmod 700 "$stage/tmp"
chmod -R a+rX "$stage/venv" "$stage/src" "$stage/tests"
cd "$stage"
as_user() {
    runuser -u "$user" -- env -i HOME="$home" PATH=/usr/bin:/bin CI=true TMPDIR="$stage/tmp" \
        PYTHONPATH="$stage/src" "$stage/venv/bin/python" "$@"
}
as_user -c "from qprobe import sandbox; print('CI: sandbox isolation as $user:', sandbox.isolation_level())"
as_user -m pytest -q -p no:cacheprovider "$@" 
