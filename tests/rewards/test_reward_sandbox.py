"""Hostile programs in the sandbox: each is contained within its limit and the test machine is unaffected."""

import os
import resource
import socket
import time
import uuid
from pathlib import Path

import pytest

from gdpo.rewards.sandbox import UID_BASE, isolation, run_python

ISO = isolation()
needs_uid = pytest.mark.skipif(not ISO["private_uid"], reason=f"no private uid here (not root?): {ISO}")
needs_netns = pytest.mark.skipif(ISO["network"], reason=f"no network namespace on this platform: {ISO}")


def sandbox_processes() -> list[int]:
    """Processes left running under a sandbox uid (none may outlive a run)."""
    left = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid >= UID_BASE:
                    left.append(int(d))
            except OSError:
                pass
    return left


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_isolation_report_is_consistent():
    # Informational on other machines; on the CI machine (root, namespaces allowed) everything holds.
    assert ISO["namespaces"] in ("root", "userns", "none")
    if ISO["namespaces"] == "root":
        assert ISO == {"namespaces": "root", "network": False, "pid_namespace": True, "private_uid": True}


def test_normal_program_runs():
    r = run_python("import sys\nprint(sys.stdin.read().upper(), end='')", "hello")
    assert (r.returncode, r.stdout, r.timed_out, r.output_truncated) == (0, "HELLO", False, False)


@pytest.mark.sandbox
@needs_uid
def test_fork_bomb_is_capped_and_fully_reaped():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t = time.monotonic()
    r = run_python(bomb, wall_s=2.0, cpu_s=2.0, max_procs=16)
    assert time.monotonic() - t < 8
    assert not r.ok
    assert sandbox_processes() == []  # nothing survives the run
    # and the machine still works: a normal run right after
    assert run_python("print(6 * 7)").stdout == "42\n"


@pytest.mark.sandbox
def test_ten_gigabyte_allocation_fails_inside_the_sandbox():
    before = maxrss_mb()
    t = time.monotonic()
    r = run_python("x = bytearray(10 * 2**30)\nprint('allocated')", memory_mb=512)
    assert time.monotonic() - t < 5
    assert r.returncode == 1 and "MemoryError" in r.stderr and "allocated" not in r.stdout
    assert maxrss_mb() - before < 100


@pytest.mark.sandbox
def test_infinite_loop_is_killed_at_the_cpu_limit():
    t = time.monotonic()
    r = run_python("while True:\n    pass", cpu_s=1.0, wall_s=20.0)
    wall = time.monotonic() - t
    assert r.returncode == -9 and not r.timed_out  # SIGKILL from RLIMIT_CPU, not our wall clock
    assert 0.8 <= r.cpu_s <= 1.5
    assert wall < 10


@pytest.mark.sandbox
def test_sleeping_program_is_killed_at_the_wall_limit():
    t = time.monotonic()
    r = run_python("import time\nprint('start', flush=True)\ntime.sleep(3600)", wall_s=1.0)
    assert r.timed_out and r.returncode is None and r.stdout == "start\n"
    assert time.monotonic() - t < 4
    assert sandbox_processes() == []


@pytest.mark.sandbox
@needs_uid
def test_writes_outside_the_temp_dir_do_not_land(tmp_path):
    tag = uuid.uuid4().hex
    repo_file = Path(__file__).resolve().parents[2] / f"escape-{tag}.txt"
    host_tmp = Path("/tmp") / f"escape-{tag}.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable host directory is out of reach
    targets = [repo_file, tmp_path / "escape.txt", host_tmp, Path("/dev/shm") / f"escape-{tag}"]
    prog = (
        "import sys\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        open(p, 'w').write('x'); print('wrote', p)\n"
        "    except OSError as e:\n"
        "        print('denied', p, type(e).__name__)\n"
    )
    r = run_python(prog, args=tuple(map(str, targets)))
    assert r.returncode == 0, r.stderr
    for p in targets:
        assert not p.exists(), f"{p} escaped the sandbox ({r.stdout})"
    # /tmp and /dev/shm are the run's own capped tmpfs inside: writes there succeed but vanish with it;
    # the repo is not in the sandbox's private root at all (FileNotFoundError), wherever it lives
    expected = "FileNotFoundError" if ISO["namespaces"] != "none" else "PermissionError"
    assert f"denied {repo_file} {expected}" in r.stdout


@pytest.mark.sandbox
@needs_netns
def test_socket_to_localhost_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        prog = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "print('connected')"
        )
        r = run_python(prog, wall_s=5)
        assert r.returncode == 1 and "connected" not in r.stdout
        assert "Network is unreachable" in r.stderr or "Errno 99" in r.stderr
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody knocked
    finally:
        server.close()


@pytest.mark.sandbox
def test_parent_environment_is_not_readable(monkeypatch):
    secret = "s3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("GDPO_TEST_SECRET", secret)
    prog = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for pid in [os.getppid(), 1] + [int(d) for d in os.listdir('/proc') if d.isdigit()]:\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(pid, type(e).__name__)\n"
    )
    r = run_python(prog)
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout and "GDPO_TEST_SECRET" not in r.stdout
    assert os.environ["GDPO_TEST_SECRET"] == secret  # the parent still has it


@pytest.mark.sandbox
def test_printing_a_gigabyte_is_capped_without_buffering_it():
    before = maxrss_mb()
    t = time.monotonic()
    prog = "import sys\nchunk = 'x' * 65536\nfor _ in range(16384):\n    sys.stdout.write(chunk)\n"  # 1 GiB
    r = run_python(prog, max_output_bytes=1 << 20, wall_s=30)
    assert r.output_truncated and len(r.stdout) == 1 << 20
    assert time.monotonic() - t < 5  # killed at the cap, not after writing 1 GiB
    assert maxrss_mb() - before < 100


@pytest.mark.sandbox
def test_file_size_limit():
    r = run_python("open('big', 'w').write('x' * (8 << 20))", fsize_mb=1)
    assert r.returncode == 1 and "File too large" in r.stderr
