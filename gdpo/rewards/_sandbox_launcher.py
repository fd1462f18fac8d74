"""The in-sandbox half of gdpo.rewards.sandbox: run as ``python -I -S -c <this file's text> <spec json>``.

It is a separate, stdlib-only program (no gdpo import) so that the caller, a reward worker that may be a fork
of a trainer holding gigabytes, starts it with one vfork+exec instead of forking its own address space three
times. Process tree:

    L (this script, root)  unshare(pid, net, mount, ipc); PDEATHSIG
      └─ G  PID 1 of the new pid namespace: private /tmp, fresh /proc, reaps orphans
           └─ P  rlimits, fresh uid, no_new_privs, PDEATHSIG, exec the program

When G exits the kernel kills everything left in its pid namespace; L's and G's PDEATHSIG make a kill of
the caller or of L cascade down. G reports P's wait status and CPU time on the status fd as JSON.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
UID_BASE = 1_000_000_000
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def unshare(flags):
    _check(libc.unshare(ctypes.c_int(flags)))


def mount(src, target, fstype, flags):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), None))


def prctl(option, arg):
    zero = ctypes.c_ulong(0)
    libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero)


def expose(pairs):
    """Make each path reachable to the sandbox uid at the same place (e.g. a Python under /root, mode 700):
    stage it, cover its hidden ancestor with an empty tmpfs (which also hides the rest of /root), and bind
    the staged path back in."""
    for n, (hidden, path) in enumerate(pairs):
        stage = "/tmp/.gdpo-stage-%d" % n
        os.mkdir(stage)
        mount(path, stage, None, MS_BIND | MS_REC)
        marker = os.path.join(hidden, ".gdpo-tmpfs")
        if not os.path.isdir(marker):
            mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV)
            os.mkdir(marker)
        os.makedirs(path, exist_ok=True)
        mount(stage, path, None, MS_BIND | MS_REC)
        libc.umount2(stage.encode(), ctypes.c_int(2))  # MNT_DETACH
        os.rmdir(stage)


def count_processes(uid):
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                n += os.stat("/proc/" + d).st_uid == uid
            except OSError:
                pass
    return n


def kill_leftovers(uid):
    """Without a pid namespace: kill what the program left behind. kill(-1) is sent *as the private uid*,
    so it reaches exactly the program's processes, never root's."""
    if uid is None:
        return
    k = os.fork()
    if k == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(1000):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
        finally:
            os._exit(0)
    os.waitpid(k, 0)


def run_p(spec, uid, nproc):
    """P: limits, privileges, exec. Never returns."""
    try:
        fd = os.open(".stdin", os.O_RDONLY)  # relative: cwd is the run's directory in every mode
        os.dup2(fd, 0)
        os.closerange(3, 65536)  # only stdin/stdout/stderr reach the program
        cpu = max(1, int(spec["cpu_s"] + 0.999))
        mem = spec["memory_mb"] << 20
        fsize = spec["fsize_mb"] << 20
        # soft == hard: at the CPU limit the kernel sends SIGKILL, which no handler can catch.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries (su, sudo) cannot raise privileges again
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # re-armed: the uid change cleared it
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(2, ("sandbox: could not start the program: %r\n" % (e,)).encode())
        except BaseException:  # noqa: BLE001
            pass
    os._exit(127)


def run_g(spec, mode, uid, alive_r, status_fd):
    """G: PID 1 of the namespace when there is one. Never returns."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(72)  # L died before PDEATHSIG was armed
        os.close(alive_r)
        tmp = spec["tmpdir"]
        if uid is not None:
            for root, _, files in os.walk(tmp):
                for name in [root] + [os.path.join(root, f) for f in files]:
                    os.chown(name, uid, uid)
        os.chdir(tmp)
        if mode != "none":
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            # /tmp last: once it is covered, the run's directory (under /tmp) is no longer reachable by path.
            for d in sorted(WORLD_WRITABLE, key=lambda d: d == "/tmp"):
                if os.path.isdir(d) and not os.path.islink(d):
                    try:
                        mount(tmp, d, None, MS_BIND)
                    except OSError:
                        pass
            os.chdir("/tmp")  # the old path of the cwd is hidden under the bind: use the new one
            expose(spec["expose"])
            try:  # /proc of the new pid namespace: other processes (and their environ) are not listed
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except OSError:
                pass
        nproc = spec["max_procs"]
        if uid is None and os.geteuid() != 0:
            # RLIMIT_NPROC counts every process of the real uid: leave room for those already running.
            nproc += count_processes(os.getuid())
        os.set_inheritable(status_fd, False)
        p = os.fork()
        if p == 0:
            run_p(spec, uid, nproc)
        os.close(1)
        os.close(2)
        # PID 1 must reap orphans; stop when the program exits (the namespace then dies with G).
        while True:
            pid, status, ru = os.wait4(-1, 0)
            if pid == p:
                break
        os.write(status_fd, json.dumps({"status": status, "cpu": ru.ru_utime + ru.ru_stime}).encode())
        if mode == "none":
            kill_leftovers(uid)
        os._exit(0)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(status_fd, json.dumps({"setup_error": repr(e)}).encode())
        except BaseException:  # noqa: BLE001
            pass
        os._exit(73)


def main(spec):
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != spec["caller"]:
        os._exit(70)  # the caller is already gone
    status_fd = spec["status_fd"]
    mode = "none"
    if spec["namespaces"]:
        base = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC
        for flags, name in ((base, "root"), (base | CLONE_NEWUSER, "userns")):
            if name == "root" and os.geteuid() != 0:
                continue
            try:
                unshare(flags)
                mode = name
                break
            except OSError:
                continue
    # A private uid needs root; without a mount namespace it also needs an interpreter it can reach.
    private = mode == "root" or (mode == "none" and os.geteuid() == 0 and not spec["expose"])
    uid = UID_BASE + os.getpid() if private else None
    alive_r, alive_w = os.pipe()
    child = []

    def stop(signum, frame):
        # The caller's way to end a run (wall clock, output cap). Killing G (PID 1) makes the kernel kill
        # the whole namespace, and G's exit is reported to us only once that is done: when this process
        # exits, nothing of the run is left. G cannot have been reaped (and its pid reused) before we do.
        if not child:
            os._exit(75)
        try:
            os.kill(child[0], signal.SIGKILL)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, stop)
    g = os.fork()
    if g == 0:
        os.close(alive_w)
        run_g(spec, mode, uid, alive_r, status_fd)
    child.append(g)
    os.close(alive_r)
    os.close(status_fd)
    os.close(1)
    os.close(2)
    _, status = os.waitpid(g, 0)
    if mode == "none":
        kill_leftovers(uid)  # no namespace to empty: at least the private uid's processes go
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 71)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
