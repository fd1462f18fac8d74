"""Reward workers never outlive the trainer, nor leave their children behind; their memory is capped.

The trainer is played by a subprocess that owns a RewardBank whose reward starts `sleep 900` and then hangs.
Every process it starts carries a marker in its environment, so after the kill the test finds any survivor in
/proc, whatever its parent has become.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from gdpo.rewards.bank import RewardBank, RewardSpec

ROOT = Path(__file__).resolve().parents[2]

TRAINER = textwrap.dedent("""
    import subprocess, sys, time
    from gdpo.rewards.bank import RewardBank, RewardSpec

    def spawn_and_hang(prompts, completions, **_):
        p = subprocess.Popen(["sleep", "900"])
        print("GRANDCHILD", p.pid, flush=True)
        time.sleep(900)
        return [1.0] * len(completions)

    bank = RewardBank([RewardSpec("hang", spawn_and_hang)], num_workers=2, timeout_s=600)
    bank.start()
    print("WORKERS", *[w.proc.pid for w in bank._workers], flush=True)
    bank.score(["p", "p"], ["a", "b"])
""")


def _alive_with_marker(marker: str) -> list[int]:
    """Pids (not zombies) whose environment holds the marker."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(int(d))
    return found


def kill_trial(sig: int, timeout_s: float = 10.0) -> tuple[int, list[int]]:
    """Start a trainer whose rewards hang with a grandchild each, send it `sig`; return (processes it had
    started, pids still alive 5 s after the trainer died)."""
    marker = f"GDPO_KILL_TRIAL={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GDPO_KILL_TRIAL": marker.split("=", 1)[1]}
    p = subprocess.Popen([sys.executable, "-c", TRAINER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    grandchildren, workers = [], []
    deadline = time.monotonic() + timeout_s
    try:
        while len(grandchildren) < 2 and time.monotonic() < deadline:
            line = p.stdout.readline()
            if line.startswith("WORKERS"):
                workers = [int(x) for x in line.split()[1:]]
            elif line.startswith("GRANDCHILD"):
                grandchildren.append(int(line.split()[1]))
        assert len(workers) == 2 and len(grandchildren) == 2, "the trainer did not start its rewards"
        started = len(_alive_with_marker(marker)) - 1  # minus the trainer itself
        assert started >= 6  # 2 workers, 2 guards, 2 sleeps
        os.kill(p.pid, sig)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    end = time.monotonic() + 5.0
    left = _alive_with_marker(marker)
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = _alive_with_marker(marker)
    for pid in left:  # do not leave them running after a failure
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return started, left


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["kill-9", "term", "ctrl-c"])
def test_workers_and_their_children_die_with_the_trainer(sig):
    started, left = kill_trial(sig)
    assert started >= 6
    assert left == [], f"{len(left)} of {started} processes survived the trainer's {signal.Signals(sig).name}"


def test_a_timed_out_worker_takes_its_children_with_it(tmp_path):
    pidfile = tmp_path / "sleep.pid"

    def spawn_and_hang(prompts, completions, **_):
        p = subprocess.Popen(["sleep", "900"])
        pidfile.write_text(str(p.pid))
        time.sleep(900)

    with RewardBank([RewardSpec("hang", spawn_and_hang, fallback=-1.0)], num_workers=1, timeout_s=1.0) as bank:
        res = bank.score(["p"], ["a"])
        assert res.timeouts == {"hang": 1} and res.matrix.tolist() == [[-1.0]]
        pid = int(pidfile.read_text())
        time.sleep(0.3)
        with open(f"/proc/{pid}/stat") if os.path.exists(f"/proc/{pid}") else open(os.devnull) as f:
            stat = f.read()
        assert stat == "" or stat.rsplit(")", 1)[1].split()[0] == "Z", "the reward's sleep outlived its worker"


BALLAST = bytearray(160 << 20)  # shared with forked workers; writing it makes private copies, VmSize unchanged


def grow_private(prompts, completions, **_):
    for i in range(0, len(BALLAST), 4096):  # dirty every page: 160 MB of private memory
        BALLAST[i] = 1
    time.sleep(5)  # the watch has time to see it
    return [1.0] * len(completions)


def allocate_big(prompts, completions, **_):
    x = bytearray(400 << 20)  # over the address-space cap: MemoryError inside the worker
    return [float(len(x))] * len(completions)


def worker_pid(prompts, completions, **_):
    return [float(os.getpid())] * len(completions)


@pytest.mark.parametrize("fn", [grow_private, allocate_big], ids=["private-memory-watch", "address-space-cap"])
def test_worker_over_its_memory_cap_is_replaced_and_counted(fn):
    specs = [RewardSpec("mem", fn, fallback=-1.0), RewardSpec("pid", worker_pid)]
    with RewardBank(specs, num_workers=1, timeout_s=30, worker_memory_mb=64, chunk_size=2) as bank:
        before = bank._workers[0].proc.pid
        t0 = time.monotonic()
        res = bank.score(["p", "p"], ["a", "b"])
        assert time.monotonic() - t0 < 5.0  # the watch acted before the reward's 5 s sleep ended
        assert res.memory == {"mem": 2, "pid": 0} and res.errors == {"mem": 0, "pid": 0}
        assert res.column("mem").tolist() == [-1.0, -1.0]
        assert res.metrics()["rewards/mem/memory_kills"] == 2.0
        after = bank._workers[0]
        assert after.proc.pid != before and after.proc.is_alive()  # replaced by a fresh worker
        assert res.column("pid").tolist() == [float(after.proc.pid)] * 2  # which scores the other reward


def test_no_memory_cap_by_default():
    with RewardBank([RewardSpec("mem", allocate_big)], num_workers=1, timeout_s=30) as bank:
        res = bank.score(["p"], ["a"])
    assert res.memory == {"mem": 0} and res.column("mem").tolist() == [float(400 << 20)]
