"""The in-sandbox half of gdpo.rewards.sandbox: run as ``python -I -S -c <this file's text> <spec json>``.

It is a separate, stdlib-only program (no gdpo import) so that the caller, a reward worker that may be a fork
of a trainer holding gigabytes, starts it with one vfork+exec instead of forking its own address space three
times. Process tree:

    L (this script)  unshare(pid, net, mount, ipc [, user]) namespaces; PDEATHSIG
      └─ G  PID 1 of the new pid namespace: builds a private root, reaps orphans
           └─ P  rlimits, fresh uid (root) or no capabilities (user namespace), no_new_privs, PDEATHSIG, exec

The private root (both namespace modes) is an empty read-only tmpfs holding only: the system directories
/usr, /lib*, /bin, /sbin (read-only, for the interpreter's shared libraries), the interpreter's own prefix
(read-only), /dev/{null,zero,full,random,urandom}, a fresh /proc of the pid namespace, and /tmp: a tmpfs of
``disk_mb`` MB (the only writable place, the program's cwd and HOME) with the program's files copied in.
G pivots into it and detaches the old root, so the project, the data, $HOME, /work... do not exist for the
program, whatever their permissions.

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
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
# statvfs f_flag bits that a bind remount must keep (the kernel refuses to clear a locked flag)
ST_FLAGS = ((2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, 2048), (2048, 4096), (4096, 1 << 21))
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
SYSTEM_FILES = ("/etc/ld.so.cache",)
DEVICES = ("null", "zero", "full", "random", "urandom")
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
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


def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)))


def bind_ro(src, target):
    """Bind src at target, read-only, keeping the source mount's locked flags (nosuid, nodev...)."""
    mount(src, target, None, MS_BIND | MS_REC)
    keep = 0
    f_flag = os.statvfs(src).f_flag
    for bit, ms in ST_FLAGS:
        if f_flag & bit:
            keep |= ms
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def build_root(spec, uid):
    """Assemble the private root under the run's directory and pivot into it (see the module docstring)."""
    new = os.path.join(spec["tmpdir"], ".root")
    os.mkdir(new)
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    covered = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            os.symlink(os.readlink(d), new + d)
        elif os.path.isdir(d):
            os.mkdir(new + d)
            bind_ro(d, new + d)
            covered.append(os.path.realpath(d))
    for f in SYSTEM_FILES:
        if os.path.isfile(f):
            _touch(new + f)
            bind_ro(f, new + f)
    for d in spec["binds"]:
        real = os.path.realpath(d)
        if not os.path.isdir(real) or any(real == c or real.startswith(c + "/") for c in covered):
            continue
        os.makedirs(new + real, exist_ok=True)
        bind_ro(real, new + real)
        covered.append(real)
        if d != real:  # a symlinked prefix: the link too
            os.makedirs(os.path.dirname(new + d), exist_ok=True)
            if not os.path.lexists(new + d):
                os.symlink(real, new + d)
    for n in DEVICES:
        _touch(new + "/dev/" + n)
        mount("/dev/" + n, new + "/dev/" + n, None, MS_BIND)
    os.symlink("/proc/self/fd", new + "/dev/fd")
    os.symlink("/tmp", new + "/dev/shm")  # POSIX semaphores etc. land in the capped /tmp
    # /tmp: the only writable place, capped in bytes and inodes
    os.mkdir(new + "/tmp")
    owner = ",uid=%d,gid=%d" % (uid, uid) if uid is not None else ""
    mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          "size=%dm,nr_inodes=%d,mode=0700%s" % (spec["disk_mb"], spec["disk_inodes"], owner))
    src = spec["tmpdir"]
    for name in os.listdir(src):
        if name == ".root":
            continue
        with open(os.path.join(src, name), "rb") as fi, open(new + "/tmp/" + name, "wb") as fo:
            fo.write(fi.read())
        if uid is not None:
            os.chown(new + "/tmp/" + name, uid, uid)
    os.mkdir(new + "/proc")
    try:  # refused in a user namespace where the host's /proc has masked parts (docker): then no /proc at all
        mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass
    os.mkdir(new + "/.old")
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError("pivot_root: unknown syscall number on %s" % os.uname().machine)
    _check(libc.syscall(ctypes.c_long(nr), new.encode(), (new + "/.old").encode()))
    os.chdir("/")
    _check(libc.umount2(b"/.old", ctypes.c_int(MNT_DETACH)))
    os.rmdir("/.old")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/tmp")


def write_id_maps(uid, gid):
    """In a fresh user namespace: map our own uid/gid to themselves (the only mapping an unprivileged user may
    write), so files in /tmp get a real owner; setgroups is denied first, as the kernel requires."""
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)), ("gid_map", "%d %d 1" % (gid, gid))):
        try:
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        except FileNotFoundError:
            if name != "setgroups":  # kernels before 3.19 have no setgroups file
                raise


def prctl(option, arg):
    zero = ctypes.c_ulong(0)
    libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero)


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
        if uid is not None and mode == "none":
            for root, _, files in os.walk(tmp):
                for name in [root] + [os.path.join(root, f) for f in files]:
                    os.chown(name, uid, uid)
        os.chdir(tmp)
        if mode != "none":
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            build_root(spec, uid)
        nproc = spec["max_procs"] + spec.get("host_procs", 0)
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
    host_procs = 0
    if os.geteuid() != 0:
        # RLIMIT_NPROC counts every process of the real uid: leave room for those already running (counted
        # here, in the host's /proc, before the pid namespace hides them).
        host_procs = count_processes(os.getuid())
    refused = []
    if spec["namespaces"]:
        base = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC
        uid0, gid0 = os.getuid(), os.getgid()
        for flags, name in ((base, "root"), (base | CLONE_NEWUSER, "userns")):
            if name == "root" and os.geteuid() != 0:
                continue
            try:
                unshare(flags)
                if name == "userns":
                    write_id_maps(uid0, gid0)
                mode = name
                break
            except OSError as e:
                refused.append("%s: %s" % (name, e))
                continue
        if mode == "none" and not spec["allow_unsandboxed"]:
            os.write(status_fd, json.dumps({"setup_error": "namespaces refused (%s)" % "; ".join(refused)}).encode())
            os._exit(74)
    spec["host_procs"] = host_procs
    # A private uid needs root; without a mount namespace it also needs an interpreter it can reach.
    private = mode == "root" or (mode == "none" and os.geteuid() == 0 and not spec["expose"])
    uid = UID_BASE + os.getpid() if private else None
    if mode == "none" and os.geteuid() == 0 and uid is None:
        # Never run generated code as root without a pid namespace: kill(-1) would reach every process.
        os.write(status_fd, json.dumps({"setup_error": "refusing to run the program as root without namespaces: "
                                        "its interpreter (under %s) is not reachable by an unprivileged uid; "
                                        "use an interpreter outside it" % spec["expose"][0][0]}).encode())
        os._exit(76)
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
