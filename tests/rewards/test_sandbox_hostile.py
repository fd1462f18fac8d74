"""Every hostile program of sandbox_hostile_cases.py is contained, run by root and by an unprivileged user.

The unprivileged tier runs the whole case list as uid 65534 (`setpriv --reuid=65534 --regid=65534
--clear-groups`) under an interpreter that user can execute (the venv's if it can, else /usr/bin/python3),
with a 0700 directory of that user holding a 0600 secret: the trainer's own files. Both tiers need root to set
up (setpriv); elsewhere the unprivileged tier is skipped and says why.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gdpo.rewards import sandbox

HERE = Path(__file__).resolve().parent
CASES_FILE = HERE / "sandbox_hostile_cases.py"
SANDBOX_FILE = Path(sandbox.__file__).resolve()
sys.path.insert(0, str(HERE))
import sandbox_hostile_cases as hostile  # noqa: E402

CASE_NAMES = [
    "read-own-0600-file", "list-own-dir", "read-project-file", "list-data-dir", "list-work-tree", "files-in-home",
    "write-next-to-own-files", "env-secret", "read-caller-environ", "inherited-fds", "disk-total-cap",
    "closed-streams-sleep", "daemon-outlives-run", "fork-bomb", "connect-to-host-loopback", "kill-minus-one",
    "allocate-10gb", "busy-loop", "write-interpreter-or-root",
]
NOBODY = 65534


def _secret_dir(owner: int) -> str:
    d = tempfile.mkdtemp(prefix="gdpo-hostile-secret-")
    with open(os.path.join(d, "secret.txt"), "w") as f:
        f.write("the trainer's own secret\n")
    os.chmod(os.path.join(d, "secret.txt"), 0o600)
    os.chmod(d, 0o700)
    if owner != os.getuid():
        for p in (d, os.path.join(d, "secret.txt")):
            os.chown(p, owner, owner)
    return d


def _as_nobody(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=timeout, cwd="/", env={"PATH": os.environ["PATH"],
                                                                                         "HOME": "/nonexistent"})


def nobody_python() -> str | None:
    """An interpreter uid 65534 can run with its stdlib (checked through a shell, so no capability of the
    caller is left to open the file for it)."""
    for exe in (sys.executable, "/usr/bin/python3"):
        try:
            r = _as_nobody("sh", "-c", f"{exe} -I -c 'import json, ctypes, select; print(1)'", timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout.strip() == "1":
            return exe
    return None


@pytest.fixture(scope="module")
def root_results():
    if os.geteuid() != 0:
        pytest.skip("the root tier needs root")
    d = _secret_dir(0)
    try:
        return hostile.run_all(sandbox, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def nobody_results():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("the unprivileged tier needs root and setpriv to become uid 65534")
    exe = nobody_python()
    if exe is None:
        pytest.skip("no interpreter that uid 65534 can run")
    for p in (CASES_FILE, SANDBOX_FILE, SANDBOX_FILE.parent / "_sandbox_launcher.py"):
        if _as_nobody("sh", "-c", f"test -r {p}").returncode:
            pytest.skip(f"uid 65534 cannot read {p}")
    d = _secret_dir(NOBODY)
    try:
        r = _as_nobody(exe, "-I", str(CASES_FILE), str(SANDBOX_FILE), d, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads(r.stdout)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    iso = json.loads(res.pop("_isolation")[1])
    if iso["namespaces"] == "none":
        pytest.skip(f"this host refuses user namespaces to uid 65534: {iso}")
    return res


def test_the_case_list_is_complete(root_results):
    assert sorted(root_results) == sorted(CASE_NAMES)


@pytest.mark.sandbox
@pytest.mark.parametrize("case", CASE_NAMES)
def test_root_tier(root_results, case):
    contained, detail = root_results[case]
    assert contained, f"{case} escaped (root): {detail}"


@pytest.mark.sandbox
@pytest.mark.parametrize("case", CASE_NAMES)
def test_unprivileged_tier(nobody_results, case):
    contained, detail = nobody_results[case]
    assert contained, f"{case} escaped (uid {NOBODY}): {detail}"


def test_secret_is_readable_outside_the_sandbox():
    # the control: the same read works for the owner without the sandbox, so DENIED inside means something
    d = _secret_dir(os.getuid())
    try:
        src, args = hostile._read_prog([os.path.join(d, "secret.txt")])
        r = subprocess.run([sys.executable, "-c", src, *args], capture_output=True, text=True, timeout=30)
        assert r.stdout.startswith("READ ")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_refusal_line_where_namespaces_are_refused(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: {"namespaces": "none", "network": True,
                                                       "pid_namespace": False, "private_uid": False,
                                                       "error": "namespaces refused (userns: [Errno 1] "
                                                                "Operation not permitted)"})
    why = sandbox.sandbox_refusal()
    assert why.startswith("this host refuses the namespaces the sandbox needs (namespaces refused (userns: "
                          "[Errno 1] Operation not permitted)); allow them: ")
    assert why.endswith("; or set rewards.allow_unsandboxed=true to run it with rlimits only")
    assert "\n" not in why


def test_run_is_refused_without_namespaces_unless_allowed(monkeypatch):
    # Simulate a host that refuses unshare: the launcher's unshare raises EPERM.
    src = sandbox._launcher_source().replace("def unshare(flags):\n",
                                             "def unshare(flags):\n    raise OSError(1, 'Operation not permitted')\n")
    monkeypatch.setattr(sandbox, "_launcher_source", lambda: src)
    r = sandbox.run_python("print('ran')")
    assert r.returncode is None and r.stdout == ""
    assert r.setup_error.startswith("namespaces refused (root: [Errno 1] Operation not permitted")
    prog = "import os; print('ran as', os.getuid())"
    if os.geteuid() != 0:
        r = sandbox.run_python(prog, allow_unsandboxed=True)
        assert r.returncode == 0 and r.stdout == f"ran as {os.getuid()}\n"
        return
    # root: allowed only under a private uid, i.e. with an interpreter such a uid can reach
    if os.path.exists("/usr/bin/python3"):
        r = sandbox.run_python(prog, allow_unsandboxed=True, python="/usr/bin/python3")
        assert r.returncode == 0 and int(r.stdout.split()[-1]) >= sandbox.UID_BASE, r
    if sandbox._needs_exposing((os.path.realpath(sys.executable),)):
        r = sandbox.run_python(prog, allow_unsandboxed=True)
        assert r.returncode is None and r.stdout == ""
        assert r.setup_error.startswith("refusing to run the program as root without namespaces: its interpreter")
