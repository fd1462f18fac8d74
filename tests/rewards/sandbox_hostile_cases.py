"""Hostile programs for gdpo's code sandbox, and how to tell whether each was contained.

Stdlib only, so that the unprivileged tier can run it under /usr/bin/python3 as uid 65534:

    python3 sandbox_hostile_cases.py <path of gdpo/rewards/sandbox.py> <secret dir>

prints one JSON object {case: [contained, detail]}. tests/rewards/test_sandbox_hostile.py runs it in-process
as root and as a subprocess under `setpriv --reuid=65534`; the README's reliability figures come from it.
`secret dir` is a directory of the calling user (mode 0700) holding a 0600 file `secret.txt`: the trainer's own
files, which generated code must neither read nor write next to.
"""

import importlib.util
import json
import os
import socket
import sys
import time
import uuid

SECRET_ENV = "GDPO_HOSTILE_SECRET_TOKEN"
PROJECT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_hostile_cases.py")
DATA_DIR = "/work/shared/data"


def load_sandbox(path):
    spec = importlib.util.spec_from_file_location("gdpo_sandbox_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _read_prog(paths):
    return (
        "import os, sys\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        if os.path.isdir(p):\n"
        "            print('LISTED', p, len(os.listdir(p)))\n"
        "        else:\n"
        "            print('READ', p, len(open(p, 'rb').read()))\n"
        "    except OSError as e:\n"
        "        print('DENIED', p, type(e).__name__)\n"
    ), tuple(paths)


def _alive_with(marker):
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/cmdline" % d, "rb") as f:
                    if marker.encode() in f.read():
                        with open("/proc/%s/stat" % d) as g:
                            if g.read().rsplit(")", 1)[1].split()[0] not in "ZX":
                                n += 1
            except OSError:
                pass
    return n


def run_all(sb, secret_dir, namespaces=True, **kw):
    """{case: (contained, detail)} for every hostile program. Namespaces only (see case 15)."""
    assert namespaces and sb.isolation()["namespaces"] != "none", "hostile cases need the namespace sandbox"
    run = lambda src, **k: sb.run_python(src, namespaces=namespaces, **{**kw, **k})  # noqa: E731
    secret = os.path.join(secret_dir, "secret.txt")
    home = os.path.expanduser("~")
    out = {}

    # 1-6. Reading the user's own files, the project, the data, /work-like trees
    for name, target in (("read-own-0600-file", secret), ("list-own-dir", secret_dir),
                         ("read-project-file", PROJECT_FILE), ("list-data-dir", DATA_DIR),
                         ("list-work-tree", "/work")):
        src, args = _read_prog([target])
        r = run(src, args=args)
        ok = r.returncode == 0 and "DENIED" in r.stdout
        out[name] = (ok, r.stdout.strip() or r.stderr[-200:])

    # 6. $HOME: no file in it, except the interpreter itself where it lives there (e.g. ~/.pyenv)
    r = run("import os, sys\nfound = []\nfor d, dirs, files in os.walk(sys.argv[1]):\n"
            "    if d.startswith(sys.base_prefix):\n        dirs[:] = []\n        continue\n"
            "    found += [os.path.join(d, f) for f in files]\nprint(len(found), found[:3])\n", args=(home,))
    out["files-in-home"] = (r.returncode == 0 and r.stdout.startswith("0 "), r.stdout.strip()[:200])

    # 7. Writing next to the user's files (and into /tmp, /dev/shm of the host)
    tag = uuid.uuid4().hex
    targets = [os.path.join(secret_dir, "planted-" + tag), "/tmp/planted-" + tag, "/dev/shm/planted-" + tag]
    src = ("import sys\nfor p in sys.argv[1:]:\n    try:\n        open(p, 'w').write('x')\n"
           "    except OSError:\n        pass\n")
    r = run(src, args=tuple(targets))
    landed = [t for t in targets if os.path.exists(t)]
    for t in landed:
        os.unlink(t)
    out["write-next-to-own-files"] = (not landed and r.returncode == 0, "landed: %s" % landed)

    # 7. Environment secrets of the trainer
    os.environ[SECRET_ENV] = "s3cr3t-" + tag
    try:
        r = run("import os; print(sorted(os.environ.items()))")
    finally:
        del os.environ[SECRET_ENV]
    out["env-secret"] = (r.returncode == 0 and "s3cr3t" not in r.stdout and SECRET_ENV not in r.stdout,
                         r.stdout.strip()[:200])

    # 8. Another process's environment through /proc (the caller's)
    r = run("import sys\ntry:\n    print(open('/proc/%d/environ', 'rb').read()[:50])\nexcept OSError as e:\n"
            "    print('DENIED', type(e).__name__)\n" % os.getpid())
    out["read-caller-environ"] = ("DENIED" in r.stdout, r.stdout.strip()[:200])

    # 9. Inherited descriptors
    r = run("import os\nopen_fds = []\nfor fd in range(3, 256):\n    try:\n        os.fstat(fd); "
            "open_fds.append(fd)\n    except OSError:\n        pass\nprint(open_fds)\n")
    out["inherited-fds"] = (r.returncode == 0 and r.stdout.strip() == "[]", r.stdout.strip())

    # 10. Total disk written: many files, each under the per-file limit
    r = run("import os\nn = 0\ntry:\n    for i in range(100):\n        with open('/tmp/f%d' % i, 'wb') as f:\n"
            "            f.write(b'x' * (8 << 20))\n        n += 8 << 20\nexcept OSError as e:\n"
            "    print('STOPPED', e.errno)\nprint('WROTE', n)\n", fsize_mb=16, disk_mb=64, memory_mb=256,
            wall_s=20, cpu_s=10)
    wrote = [int(x.split()[1]) for x in r.stdout.splitlines() if x.startswith("WROTE")]
    out["disk-total-cap"] = (bool(wrote) and wrote[0] <= 64 << 20, r.stdout.strip()[-100:])

    # 11. Closing stdout/stderr, then sleeping past the wall clock
    t0 = time.monotonic()
    r = run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(30)\n", wall_s=2)
    dt = time.monotonic() - t0
    out["closed-streams-sleep"] = (r.timed_out and dt < 4.0, "timed_out=%s in %.1fs" % (r.timed_out, dt))

    # 12. A daemon that escapes into its own session, then the run ends
    marker = "gdpo-hostile-daemon-" + tag
    src = ("import os, sys, time\n"
           "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
           "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(900)', %r])\n"
           "    os._exit(0)\n"
           "time.sleep(0.5)\nprint('parent done')\n" % marker)
    r = run(src, wall_s=5)
    time.sleep(0.2)
    left = _alive_with(marker)
    out["daemon-outlives-run"] = (left == 0, "left=%d rc=%s" % (left, r.returncode))

    # 13. Fork bomb
    marker = "gdpo-hostile-bomb-" + tag
    src = ("import os, sys, time\n"
           "for _ in range(64):\n    try:\n        os.fork()\n    except OSError:\n        break\n"
           "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(900)', %r])\n" % marker)
    t0 = time.monotonic()
    r = run(src, wall_s=3, max_procs=16)
    time.sleep(0.2)
    left = _alive_with(marker)
    out["fork-bomb"] = (left == 0 and time.monotonic() - t0 < 8, "left=%d timed_out=%s" % (left, r.timed_out))

    # 14. Network: a server the caller listens on at 127.0.0.1
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        r = run("import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', %d))\n"
                "    print('CONNECTED')\nexcept OSError as e:\n    print('DENIED', e.errno)\n" % port, wall_s=5)
    finally:
        srv.close()
    out["connect-to-host-loopback"] = ("DENIED" in r.stdout, r.stdout.strip())

    # 15. Signal every process it can (kill -1): the caller must survive and get a result. Only with
    # namespaces: without a pid namespace this reaches every process of the user (all of them, as root).
    assert namespaces, "never run the hostile cases without namespaces: kill(-1) would hit the host"
    r = run("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\nprint('alive')\n")
    out["kill-minus-one"] = (True, "caller alive; rc=%s" % r.returncode)  # reaching this line is the test

    # 16. Memory: a 10 GB allocation
    r = run("x = bytearray(10 << 30)\nprint('ALLOCATED')\n", memory_mb=512)
    out["allocate-10gb"] = ("ALLOCATED" not in r.stdout, "rc=%s" % r.returncode)

    # 17. CPU: a busy loop
    t0 = time.monotonic()
    r = run("while True:\n    pass\n", cpu_s=1, wall_s=10)
    out["busy-loop"] = (r.returncode == -9 and time.monotonic() - t0 < 5, "rc=%s" % r.returncode)

    # 18. Write the program's own interpreter / system dirs (read-only inside)
    src, _ = _read_prog([])
    r = run("import sys, os\nbad = []\nfor p in (sys.executable, '/usr/lib/planted', '/planted', "
            "os.path.join(sys.prefix, 'planted')):\n    try:\n        open(p, 'ab').close(); bad.append(p)\n"
            "    except OSError:\n        pass\nprint(bad)\n")
    out["write-interpreter-or-root"] = (r.returncode == 0 and r.stdout.strip() == "[]", r.stdout.strip())
    return out


def main():
    sb = load_sandbox(sys.argv[1])
    iso = sb.isolation()
    if iso["namespaces"] == "none":  # refuse rather than run hostile code on the host
        print(json.dumps({"_isolation": (True, json.dumps(iso))}))
        return
    res = run_all(sb, sys.argv[2])
    res["_isolation"] = (True, json.dumps(iso))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
