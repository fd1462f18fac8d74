"""Run an untrusted Python program with hard limits, for the code rewards.

The caller starts `_sandbox_launcher.py` with one vfork+exec (never forking its own, possibly huge,
address space); the launcher builds the process tree

    L (launcher)  unshare(pid, net, mount, ipc) namespaces; as a non-root user also a user namespace
      └─ G  PID 1 of the new pid namespace; builds a private root and pivots into it; fresh /proc
           └─ P  rlimits, a fresh uid (root) / no capabilities (user namespace), no_new_privs, exec python

* A private root, as root and as an unprivileged user alike: an empty read-only tmpfs holding only /usr,
  /lib*, /bin, /sbin and /etc/ld.so.cache (read-only: the interpreter's shared libraries), the interpreter's
  own prefix (read-only; with `site_packages` also the venv), /dev/{null,zero,full,random,urandom}, a /proc
  of the pid namespace, and /tmp: a tmpfs of `disk_mb` MB and 4096 inodes, the program's cwd and HOME and
  the only writable place (/dev/shm points there). The old root is detached, so the project, the data,
  $HOME, /work... and every file of the trainer's user do not exist for the program, whatever their mode.
* Limits: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (one file; `disk_mb` caps them all), RLIMIT_NPROC,
  RLIMIT_NOFILE, RLIMIT_CORE=0 on P; the wall clock and the output cap are enforced by the caller, which
  reads at most `max_output_bytes` of each stream (so printing 1 GB never makes the caller buffer 1 GB) and
  then stops the run; a program that closes its stdout and stderr is still stopped at the wall clock.
* Killing is total: to stop a run the caller asks L, which SIGKILLs G (PID 1); the kernel then kills every
  process left in the pid namespace (a fork bomb, a daemonised child, a `setsid` escape) before it reports
  G's death, so when `run_python` returns nothing of the run is left. L and G also carry
  PR_SET_PDEATHSIG=SIGKILL, so a reward worker killed by the bank takes its sandboxes down too.
* When running as root, P runs as uid/gid ``UID_BASE + pid(L)``: a uid no other process has, so
  RLIMIT_NPROC (which is per uid and does not bind root) caps exactly this program's processes.
* No network: a new network namespace has only a downed loopback, so even 127.0.0.1 is unreachable.
* The environment is built from scratch (PATH, HOME, LANG and thread-count pins): no parent variable leaks;
  only stdin/stdout/stderr are open in P.

Where the platform refuses namespaces (no CAP_SYS_ADMIN and no unprivileged user namespaces) a run is
refused (`setup_error`), unless `allow_unsandboxed` (``rewards.allow_unsandboxed``): then only rlimits, the
cleared environment, a private uid as root (a root run whose interpreter that uid cannot reach is refused)
and a session killed as a group hold; no file, network or pid isolation. `isolation()` reports what holds
on this machine, `sandbox_refusal()` the one line the trainer prints at start. Not provided: seccomp
syscall filtering and a cgroup memory cap for the whole tree (memory is bounded by ``memory_mb * max_procs``
plus `disk_mb`).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional

__all__ = ["SandboxResult", "run_python", "isolation"]

# Far above any real account (and below 2**31): uid = UID_BASE + pid of L is unique among live runs.
UID_BASE = 1_000_000_000
_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")


@lru_cache(maxsize=1)
def _launcher_source() -> str:
    with open(_LAUNCHER, encoding="utf-8") as f:
        return f.read()


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    `returncode` is the exit status, or -signal when the program was killed by a signal (SIGKILL from the
    CPU limit, SIGSEGV from a crash...); None when the caller stopped it (wall timeout, output cap) or it
    never started (setup failure).
    """

    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool = False  # wall-clock limit hit
    output_truncated: bool = False  # a stream exceeded max_output_bytes; the program was killed
    wall_s: float = 0.0
    cpu_s: float = 0.0
    setup_error: Optional[str] = None  # the sandbox itself could not start the program

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


@lru_cache(maxsize=8)
def _needs_exposing(paths: tuple[str, ...]) -> list[tuple[str, str]]:
    """(hidden ancestor, path) for each path an unprivileged uid cannot reach, e.g. a Python under /root."""
    out: list[tuple[str, str]] = []
    real = sorted({os.path.realpath(p if os.path.isdir(p) else os.path.dirname(p)) for p in paths})
    for p in real:
        if any(p == q or p.startswith(q + "/") for _, q in out):
            continue  # already inside an exposed directory
        parts = p.split("/")[1:]
        for i in range(1, len(parts)):
            a = "/" + "/".join(parts[:i])
            try:
                if not os.stat(a).st_mode & 0o001:
                    out.append((a, "/" + "/".join(parts)))
                    break
            except OSError:
                break
    return out


_ALLOW_UNSANDBOXED = [False]


def set_allow_unsandboxed(allow: bool) -> None:
    """Process-wide default of `run_python(allow_unsandboxed=...)` (the config's ``rewards.allow_unsandboxed``;
    the reward bank sets it in each worker)."""
    _ALLOW_UNSANDBOXED[0] = bool(allow)


def _interpreter_dirs(exe: str, own: bool, site_packages: bool) -> list[str]:
    """Directories the interpreter needs inside the private root besides /usr and /lib: its prefix (and a
    venv's, when site-packages are wanted)."""
    real = os.path.realpath(exe)
    dirs = [os.path.dirname(os.path.dirname(real))]
    if site_packages and os.path.abspath(exe) != real:
        dirs.append(os.path.dirname(os.path.dirname(os.path.abspath(exe))))
    if own:
        dirs.append(sys.base_prefix)
        if site_packages:
            dirs.append(sys.prefix)
    return sorted(set(dirs))


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


# The program's whole environment: nothing of the trainer's (no tokens, no paths) reaches it.
_PROGRAM_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _write_inputs(tmpdir: str, source: str, stdin: str, files: Optional[Mapping[str, str]]) -> None:
    """main.py, .stdin and the extra files into the run's private directory."""

    def enc(s: str) -> bytes:  # lone surrogates (binary junk) become U+FFFD instead of raising
        return s.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace").encode()

    with open(os.path.join(tmpdir, "main.py"), "wb") as f:
        f.write(enc(source))
    with open(os.path.join(tmpdir, ".stdin"), "wb") as f:
        f.write(enc(stdin))
    for name, text in (files or {}).items():
        with open(os.path.join(tmpdir, os.path.basename(name)), "wb") as f:
            f.write(enc(text))
    os.chmod(tmpdir, 0o700)


def _finish(launcher, out_r: int, err_r: int, status_r: int, t0: float, wall_s: float,
            max_output_bytes: int) -> SandboxResult:
    """Read the program's output until it ends or the wall clock runs out, stop it, and report."""
    out, err, timed_out, truncated = _collect(out_r, err_r, t0 + wall_s, max_output_bytes)
    if not (timed_out or truncated):
        # Both streams closed, but the program may have closed them itself and still be running.
        try:
            launcher.wait(timeout=max(0.0, t0 + wall_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out or truncated:
        _stop(launcher)
    launcher.wait()
    status = _read_all(status_r)
    info = json.loads(status) if status else {}
    rc: Optional[int] = None
    if "status" in info and not (timed_out or truncated):
        rc = os.waitstatus_to_exitcode(info["status"])
    return SandboxResult(
        returncode=rc,
        stdout=_decode(out),
        stderr=_decode(err),
        timed_out=timed_out,
        output_truncated=truncated,
        wall_s=time.monotonic() - t0,
        cpu_s=float(info.get("cpu", 0.0)),
        setup_error=info.get("setup_error") or (None if info or timed_out or truncated else "no status"),
    )


def run_python(
    source: str,
    stdin: str = "",
    *,
    args: tuple[str, ...] = (),
    files: Optional[Mapping[str, str]] = None,
    wall_s: float = 10.0,
    cpu_s: float = 5.0,
    memory_mb: int = 512,
    fsize_mb: int = 16,
    disk_mb: int = 64,
    max_procs: int = 16,
    max_output_bytes: int = 1 << 20,
    python: Optional[str] = None,
    site_packages: bool = False,
    namespaces: bool = True,
    allow_unsandboxed: Optional[bool] = None,
) -> SandboxResult:
    """Run `source` as ``python -I -S main.py *args`` in a fresh sandbox and return what it did.

    `files` are extra files written next to main.py. `site_packages=True` drops ``-S`` so the program can
    import the installed packages (numpy...), at ~40 ms more start-up per run; it needs an interpreter outside
    the world-writable directories (a venv under /tmp is hidden in the sandbox: use the default there).
    `disk_mb` caps everything the program writes (its /tmp is a tmpfs of that size; `fsize_mb` caps one
    file). `namespaces=False` skips the pid/net/mount namespaces (for comparison; limits and the private uid
    still apply where possible). Where the host refuses namespaces the run is refused (`setup_error`) unless
    `allow_unsandboxed` (None = the process-wide setting of `set_allow_unsandboxed`, off by default).
    Never raises for anything the program does.

    >>> r = run_python("print(sum(map(int, input().split())))", "2 3\\n")
    >>> r.returncode, r.stdout
    (0, '5\\n')
    >>> run_python("while True: pass", cpu_s=1).returncode  # killed by the CPU limit
    -9
    """
    t0 = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="gdpo-sandbox-")
    fds: list[int] = []
    try:
        _write_inputs(tmpdir, source, stdin, files)
        (out_r, out_w), (err_r, err_w), (status_r, status_w) = os.pipe(), os.pipe(), os.pipe()
        fds += [out_r, out_w, err_r, err_w, status_r, status_w]
        exe = python or sys.executable
        if not site_packages:
            # With -S a venv adds nothing, so run the interpreter it links to: a venv's bin/python is a symlink
            # that may live under /tmp (a checkout there), which the sandbox covers with the run's own directory.
            exe = os.path.realpath(exe)
        binds = _interpreter_dirs(exe, python is None, site_packages)
        spec = {
            "caller": os.getpid(), "tmpdir": tmpdir, "status_fd": status_w, "env": dict(_PROGRAM_ENV),
            "argv": [exe, "-I", "-B", *(() if site_packages else ("-S",)), "main.py", *args],
            "cpu_s": cpu_s, "memory_mb": int(memory_mb), "fsize_mb": int(fsize_mb), "max_procs": int(max_procs),
            "namespaces": namespaces,
            "allow_unsandboxed": _ALLOW_UNSANDBOXED[0] if allow_unsandboxed is None else bool(allow_unsandboxed),
            "disk_mb": max(1, int(disk_mb)), "disk_inodes": 4096,
            "binds": binds, "expose": _needs_exposing((os.path.realpath(exe), *binds)),
        }
        try:
            # No preexec_fn, so CPython spawns with vfork: no copy of this process's page tables.
            launcher = subprocess.Popen(
                [exe, "-I", "-S", "-B", "-c", _launcher_source(), json.dumps(spec)], stdin=subprocess.DEVNULL,
                stdout=out_w, stderr=err_w, pass_fds=(status_w,), cwd=tmpdir,
                env={"PATH": _PROGRAM_ENV["PATH"], "LC_ALL": "C.UTF-8"}, start_new_session=True,
            )
        except OSError as e:
            return SandboxResult(None, "", "", wall_s=time.monotonic() - t0, setup_error=repr(e))
        for fd in (out_w, err_w, status_w):
            os.close(fd)
            fds.remove(fd)
        return _finish(launcher, out_r, err_r, status_r, t0, wall_s, max_output_bytes)
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(tmpdir, ignore_errors=True)


def _stop(launcher: subprocess.Popen) -> None:
    """End a run and return only once all of its processes are gone (see the launcher's SIGTERM handler)."""
    try:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=10)
        return
    except subprocess.TimeoutExpired:
        pass
    # Unresponsive launcher: its death still SIGKILLs G (PDEATHSIG); the session group is the last handle.
    for target in (-launcher.pid, launcher.pid):
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _collect(out_r: int, err_r: int, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = [out_r, err_r]
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(bufs[out_r]), bytes(bufs[err_r]), True, False
        try:
            ready, _, _ = select.select(open_fds, [], [], left)
        except InterruptedError:
            continue
        for fd in ready:
            b = os.read(fd, 65536)
            if not b:
                open_fds.remove(fd)
                continue
            buf = bufs[fd]
            room = cap - len(buf)
            buf += b[:room]
            if len(b) > room:
                return bytes(bufs[out_r]), bytes(bufs[err_r]), False, True
    return bytes(bufs[out_r]), bytes(bufs[err_r]), False, False


@lru_cache(maxsize=1)
def isolation() -> dict:
    """What the sandbox guarantees on this machine, found by trying (cached): keys
    ``namespaces`` ("root", "userns" or "none"), ``network``, ``pid_namespace``, ``private_uid``."""
    probe = (
        "import os, socket\n"
        "s = socket.socket()\n"
        "s.settimeout(1)\n"
        "try:\n"
        "    s.connect(('127.0.0.1', 9)); net = True\n"
        "except OSError as e:\n"
        "    net = e.errno not in (101, 99)\n"  # ENETUNREACH / EADDRNOTAVAIL: no usable loopback
        "print(os.getuid(), os.getpid(), int(net))\n"
    )
    r = run_python(probe, wall_s=20, cpu_s=10, allow_unsandboxed=True)
    try:
        uid, pid, net = (int(x) for x in r.stdout.split())
    except ValueError:
        return {"namespaces": "none", "network": True, "pid_namespace": False, "private_uid": False,
                "error": (r.setup_error or "") + r.stderr[-500:]}
    ns = "none" if pid > 3 else ("root" if uid >= UID_BASE else "userns")
    return {"namespaces": ns, "network": bool(net), "pid_namespace": pid <= 3, "private_uid": uid >= UID_BASE}




def _sysctl(name: str) -> Optional[str]:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def sandbox_refusal() -> Optional[str]:
    """None where generated code can run isolated; else one line saying why not and how to allow it."""
    iso = isolation()
    if iso["namespaces"] != "none":
        return None
    knobs = []
    for name, good in (("user.max_user_namespaces", "15000"), ("kernel.unprivileged_userns_clone", "1"),
                       ("kernel.apparmor_restrict_unprivileged_userns", "0")):
        value = _sysctl(name)
        if value is not None and value != good and not (name == "user.max_user_namespaces" and value != "0"):
            knobs.append(f"sysctl -w {name}={good} (now {value})")
    how = "; ".join(knobs) or "run as root, or in a container that allows unshare(CLONE_NEWUSER) (e.g. docker " \
                               "--security-opt seccomp=unconfined)"
    err = str(iso.get("error", "")).strip().splitlines()
    return (f"this host refuses the namespaces the sandbox needs ({err[-1][:160] if err else 'unshare failed'}); "
            f"allow them: {how}; or set rewards.allow_unsandboxed=true to run it with rlimits only")
