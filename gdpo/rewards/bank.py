"""The reward bank: a batch of (prompt, completion, dataset columns) -> a named reward matrix [N, K].

A reward function is a plain function

    fn(prompts, completions, *, completion_lengths, **columns, **kwargs) -> list[float | None]

(None = "does not apply", NaN in the matrix). The bank calls each reward on chunks of rows in a pool of
worker processes, each call under a timeout. A call that raises, hangs, kills its worker, or returns the
wrong number of values or a non-number gives the reward's `fallback` for that call's rows and counts them in
`errors` / `timeouts`; the first traceback per reward is logged once, and scoring goes on. A hung worker is
killed and replaced; the pool lives across `score` calls until `close()`.

Workers never outlive the trainer: each runs in its own session (so Ctrl-C reaches only the trainer, which
closes the pool) with PR_SET_PDEATHSIG=SIGKILL, so a kill -9 / SIGTERM of the trainer kills it at once; and
each has a tiny guard process in its session that, when the worker dies for any reason, SIGKILLs the
worker's whole process group (a reward that started `sleep 900` leaves nothing behind). `worker_memory_mb`
caps a worker's memory growth (soft RLIMIT_AS over its size at start, plus a watch of its private memory);
a worker over it is replaced and its rows counted in `memory`. NaNs ("does not apply") are counted per
reward in `nans`, so a 0/0 bug shows as `rewards/<name>/nan_frac`.

Conditioned rewards (the paper's "length counts only when correct") are applied after scoring, in
dependency order: where the condition's reward is below its threshold, or NaN, the conditioned reward
becomes 0; a NaN ("does not apply") stays NaN. The condition reads the other reward after its own
condition, so chains compose (for an unconditioned reward that is its raw value).
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import logging
import math
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as _wait
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["BUILTINS", "Condition", "RewardSpec", "RewardResult", "RewardBank", "resolve_reward_fn"]

log = logging.getLogger(__name__)

BUILTINS: dict[str, str] = {
    "math_correct": "gdpo.rewards.math:math_correct",
    "integer": "gdpo.rewards.math:integer",
    "length": "gdpo.rewards.lengths:length",
    "overlong": "gdpo.rewards.lengths:overlong",
    "format": "gdpo.rewards.formats:format_reward",
    "toolcall_correct": "gdpo.rewards.toolcall:toolcall_correct",
    "code_pass": "gdpo.rewards.code:code_pass",
    "code_bug": "gdpo.rewards.code:code_bug",
}

# Column names that would collide with the reward function's own arguments.
_RESERVED = ("prompts", "completions", "completion_lengths")


@dataclass
class Condition:
    """The conditioned reward counts only where reward `on` is >= `threshold`; elsewhere it is 0."""

    on: str
    threshold: float = 1.0


@dataclass
class RewardSpec:
    """One reward of the bank. `fn` is a built-in name, ``package.module:function``, or a callable."""

    name: str
    fn: Any
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    condition: Optional[Condition] = None
    fallback: float = 0.0


def _get(obj: Any, key: str, default: Any = None) -> Any:
    # Specs and conditions are duck-typed: the config's dataclasses, ours, or plain dicts from YAML.
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def resolve_reward_fn(fn: Any, name: str = "?") -> Callable:
    """A callable for a built-in name, a ``package.module:function`` string, or a callable (returned as is).

    >>> resolve_reward_fn("length").__name__
    'length'
    >>> resolve_reward_fn("nope", "r1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: reward 'r1': unknown fn 'nope'; allowed: a built-in (code_bug, ...) or 'package.module:...'
    """
    if callable(fn):
        return fn
    allowed = f"a built-in ({', '.join(sorted(BUILTINS))}) or 'package.module:function'"
    if not isinstance(fn, str) or not fn.strip():
        raise ValueError(f"reward {name!r}: fn must be a string or a callable, "
                         f"got {fn!r}; allowed: {allowed}")
    target = BUILTINS.get(fn.strip())
    if target is None:
        if ":" not in fn:
            raise ValueError(f"reward {name!r}: unknown fn {fn!r}; allowed: {allowed}")
        target = fn.strip()
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {name!r}: bad fn {fn!r}; expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error here
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} for fn {fn!r}: {e!r}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r} (fn {fn!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {name!r}: {fn!r} is not callable")
    return obj


def check_reward_kwargs(fn: Callable, kwargs: Mapping[str, Any], name: str = "?", *, builtin: bool = False) -> None:
    """ValueError naming each keyword in `kwargs` that `fn` does not take.

    A built-in takes exactly its named keyword parameters (its ``**_`` only swallows dataset columns, so a
    typo such as ``max_token`` would otherwise fall back to the default silently); a user function with
    ``**kwargs`` takes anything.

    >>> from gdpo.rewards.lengths import length
    >>> check_reward_kwargs(length, {"max_token": 20}, "short", builtin=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: reward 'short': unknown kwargs ['max_token'] for length; allowed: graded, margin, max_tokens
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # a builtin without a signature (C function): nothing to check against
    named = [p.name for p in params.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _RESERVED]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if open_ended and not builtin:
        return
    bad = sorted(k for k in kwargs if k not in named)
    if bad:
        label = getattr(fn, "__name__", repr(fn))
        raise ValueError(f"reward {name!r}: unknown kwargs {bad} for {label}; "
                         f"allowed: {', '.join(sorted(named)) or 'none'}")


@dataclass
class RewardResult:
    """Rewards of one batch. `matrix[i, k]` is reward `names[k]` of rollout i (NaN: does not apply).

    `seconds` sums the wall time of each reward's calls (across workers), `errors` / `timeouts` count the
    rollouts that got the fallback because a call failed / ran out of time. `wall_s` is the whole `score`.
    """

    matrix: torch.Tensor
    names: list[str]
    weights: list[float]
    seconds: dict[str, float]
    errors: dict[str, int]
    timeouts: dict[str, int]
    wall_s: float = 0.0
    nans: dict[str, int] = field(default_factory=dict)  # rollouts whose value is NaN ("does not apply")
    memory: dict[str, int] = field(default_factory=dict)  # rollouts whose worker went over worker_memory_mb

    def column(self, name: str) -> torch.Tensor:
        return self.matrix[:, self.names.index(name)]

    def metrics(self) -> dict[str, float]:
        """Flat logging dict: ``rewards/<name>/{mean,std,errors,timeouts,memory_kills,nan_frac,seconds}``
        (mean/std skip NaN; nan_frac = share of rollouts the reward did not apply to).

        >>> m = torch.tensor([[1.0], [0.0], [float("nan")]])
        >>> r = RewardResult(m, ["acc"], [1.0], {"acc": 0.5}, {"acc": 0}, {"acc": 1})
        >>> [round(r.metrics()[f"rewards/acc/{k}"], 4) for k in ("mean", "std", "timeouts", "nan_frac")]
        [0.5, 0.5, 1.0, 0.3333]
        """
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            col = self.matrix[:, k].double()
            valid = col[~torch.isnan(col)]
            out[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else float("nan")
            out[f"rewards/{name}/std"] = valid.std(unbiased=False).item() if valid.numel() else float("nan")
            out[f"rewards/{name}/errors"] = float(self.errors.get(name, 0))
            out[f"rewards/{name}/timeouts"] = float(self.timeouts.get(name, 0))
            out[f"rewards/{name}/memory_kills"] = float(self.memory.get(name, 0))
            n = col.numel()
            out[f"rewards/{name}/nan_frac"] = (n - valid.numel()) / n if n else 0.0
            out[f"rewards/{name}/seconds"] = float(self.seconds.get(name, 0.0))
        return out


PR_SET_PDEATHSIG = 1


def _prctl_pdeathsig(sig: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0))
    except (OSError, AttributeError):  # not Linux: the guard and close() still clean up
        pass


def _start_guard(worker_pid: int) -> None:
    """Fork the guard: it waits for the worker (its parent) to die, then SIGKILLs the worker's process group,
    which holds everything the rewards started that did not leave the session on purpose (and the guard)."""
    pid = os.fork()
    if pid:
        return
    try:
        os.closerange(3, 65536)  # holds nothing of the worker's: its pipe to the bank sees EOF when it dies
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # taken by sigtimedwait, the moment it comes
        _prctl_pdeathsig(signal.SIGUSR1)
        while os.getppid() == worker_pid:  # the ppid check covers a death before prctl
            if signal.sigtimedwait([signal.SIGUSR1], 1.0) is not None:
                break
        os.killpg(worker_pid, signal.SIGKILL)
    finally:
        os._exit(0)


def _private_mb(pid: int) -> float:
    """Memory only this process holds (pages shared with the trainer it was forked from do not count)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kb = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty")))
        return kb / 1024
    except (OSError, ValueError, IndexError):
        return 0.0


def _vm_size() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _worker_main(conn: Any, fn_refs: list, parent: int = 0, memory_mb: int = 0,
                 allow_unsandboxed: bool = False) -> None:
    # Own session: Ctrl-C goes to the trainer (which shuts the pool down), not to the workers mid-call; and
    # the session's process group is what the guard and the bank kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.setsid()
    except OSError:
        pass
    _prctl_pdeathsig(signal.SIGKILL)
    if parent and os.getppid() != parent:
        os._exit(0)  # the trainer died before the death signal was armed
    _start_guard(os.getpid())
    if memory_mb > 0:
        import resource

        # Soft limit only (the sandbox launcher may raise it again for its own, smaller, rlimits).
        soft = _vm_size() + (memory_mb << 20)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    from gdpo.rewards import sandbox

    sandbox.set_allow_unsandboxed(allow_unsandboxed)
    fns = [resolve_reward_fn(ref) for ref in fn_refs]
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, k, prompts, completions, lengths, columns, kwargs = msg
        t0 = time.perf_counter()
        try:
            values = fns[k](prompts, completions, completion_lengths=lengths, **{**columns, **kwargs})
            if isinstance(values, (str, bytes, Mapping)):
                raise TypeError(f"reward returned {type(values).__name__}, expected a list")
            reply = (task_id, "ok", list(values), time.perf_counter() - t0)
        except MemoryError:
            reply = (task_id, "memory", traceback.format_exc(), time.perf_counter() - t0)
        except BaseException:  # noqa: BLE001 - SystemExit from a reward is an error too
            reply = (task_id, "error", traceback.format_exc(), time.perf_counter() - t0)
        try:
            conn.send(reply)
        except Exception:  # noqa: BLE001 - e.g. an unpicklable value in the result
            conn.send((task_id, "error", traceback.format_exc(), time.perf_counter() - t0))


class _Worker:
    def __init__(self, ctx: Any, fn_refs: list, memory_mb: int = 0, allow_unsandboxed: bool = False) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        # fork / spawn: the worker's parent is this process (a forkserver's workers have the server as parent)
        parent = os.getpid() if ctx.get_start_method() in ("fork", "spawn") else 0
        self.proc = ctx.Process(target=_worker_main, args=(child, fn_refs, parent, memory_mb, allow_unsandboxed),
                                daemon=True, name="gdpo-reward")
        self.proc.start()
        child.close()
        self.task: Optional[tuple] = None  # (task_id, k, start, stop, deadline, t0)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (the worker, its guard, whatever its rewards started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, TypeError):
            pass  # not yet its own group leader (or already gone): the plain kill below, then the guard
        try:
            self.proc.kill()
            self.proc.join(5)
        except Exception:  # noqa: BLE001
            pass
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except Exception:  # noqa: BLE001
            pass


def _to_values(values: list, n: int) -> np.ndarray:
    """Float array of a reward's output; ValueError naming the problem when it is not n numbers/None."""
    if len(values) != n:
        raise ValueError(f"returned {len(values)} values for {n} rollouts")
    out = np.empty(n, dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            out[i] = np.nan
            continue
        if isinstance(v, (bool, np.bool_)):
            out[i] = float(v)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"value {v!r} for rollout {i} is not a number or None") from None
        if isinstance(v, (str, bytes)) or (math.isinf(f)):
            raise ValueError(f"value {v!r} for rollout {i} is not a finite number or None")
        out[i] = f  # NaN passes: it already means "does not apply"
    return out


class RewardBank:
    """Scores batches with several rewards in a process pool.

    Args:
        specs: reward entries with ``name, fn, weight, kwargs, condition, fallback`` (RewardSpec, the
            config's dataclasses, or dicts).
        num_workers: worker processes; 0 means one per available core.
        timeout_s: limit for one call (one reward on one chunk of rows); past it the worker is killed.
        chunk_size: most rows per call. A reward function may ask for fewer with a ``rows_per_call``
            attribute (the code rewards do); rows are also spread so that every worker gets work.
        start_method: "fork" (default: workers inherit the imported rewards and any callable, start in
            milliseconds), "forkserver" or "spawn" (rewards must then be importable by reference).
        worker_memory_mb: cap on each worker's memory growth in MB (0 = off): a worker over it is replaced,
            and its rows get the fallback and are counted in ``RewardResult.memory``.
        allow_unsandboxed: let code rewards run programs where the host refuses namespaces.

    >>> with RewardBank([RewardSpec("short", "length", kwargs={"max_tokens": 3})], num_workers=1) as bank:
    ...     bank.score(["p", "p"], ["a b", "a b c d"], [2, 4]).matrix.tolist()
    [[1.0], [0.0]]
    """

    def __init__(
        self,
        specs: Sequence[Any],
        *,
        num_workers: int = 0,
        timeout_s: float = 60.0,
        chunk_size: int = 64,
        start_method: str = "fork",
        worker_memory_mb: int = 0,
        allow_unsandboxed: bool = False,
    ) -> None:
        if not specs:
            raise ValueError("the reward bank needs at least one reward")
        self.names: list[str] = []
        self.weights: list[float] = []
        self.kwargs: list[dict] = []
        self.fallbacks: list[float] = []
        self.conditions: list[Optional[tuple[str, float]]] = []
        self._fns: list[Callable] = []
        self._refs: list[Any] = []
        for spec in specs:
            name = _get(spec, "name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"reward name must be a non-empty string, got {name!r}")
            if name in self.names:
                raise ValueError(f"reward {name!r}: duplicate name; reward names must be unique")
            fn = _get(spec, "fn")
            self._fns.append(resolve_reward_fn(fn, name))
            self._refs.append(fn)
            kwargs = _get(spec, "kwargs") or {}
            if not isinstance(kwargs, Mapping):
                raise ValueError(f"reward {name!r}: kwargs must be a mapping, got {type(kwargs).__name__}")
            bad = [k for k in kwargs if k in _RESERVED]
            if bad:
                raise ValueError(f"reward {name!r}: kwargs may not set {bad}; those are passed by the bank")
            is_builtin = isinstance(fn, str) and fn.strip() in BUILTINS
            check_reward_kwargs(self._fns[-1], kwargs, name, builtin=is_builtin)
            try:
                weight = float(_get(spec, "weight", 1.0))
                fallback = float(_get(spec, "fallback", 0.0))
            except (TypeError, ValueError):
                raise ValueError(f"reward {name!r}: weight and fallback must be numbers") from None
            self.names.append(name)
            self.weights.append(weight)
            self.kwargs.append(dict(kwargs))
            self.fallbacks.append(fallback)
            cond = _get(spec, "condition")
            if cond is None:
                self.conditions.append(None)
            else:
                on, threshold = _get(cond, "on"), _get(cond, "threshold", 1.0)
                try:
                    threshold = float(threshold)
                except (TypeError, ValueError):
                    raise ValueError(f"reward {name!r}: condition threshold must be a number") from None
                self.conditions.append((on, threshold))
        self._order = self._condition_order()
        cores = len(os.sched_getaffinity(0))
        self.num_workers = int(num_workers) if num_workers and num_workers > 0 else cores
        self.timeout_s = float(timeout_s)
        self.chunk_size = max(1, int(chunk_size))
        self.worker_memory_mb = max(0, int(worker_memory_mb))
        self.allow_unsandboxed = bool(allow_unsandboxed)
        self._ctx = mp.get_context(start_method)
        self._start_method = start_method
        self._workers: list[_Worker] = []
        self._task_id = 0
        self._logged: set[str] = set()

    @classmethod
    def from_config(cls, cfg) -> "RewardBank":
        """A bank from the ``rewards`` config section (gdpo.config.RewardsConfig)."""
        return cls(cfg.functions, num_workers=cfg.num_workers, timeout_s=cfg.timeout_s,
                   worker_memory_mb=cfg.worker_memory_mb, allow_unsandboxed=cfg.allow_unsandboxed)

    def _condition_order(self) -> list[int]:
        """Indices of conditioned rewards, each after the reward it depends on; ValueError on a bad graph."""
        for name, cond in zip(self.names, self.conditions):
            if cond is None:
                continue
            on = cond[0]
            if on == name:
                raise ValueError(f"reward {name!r}: condition on itself")
            if on not in self.names:
                raise ValueError(
                    f"reward {name!r}: condition on unknown reward {on!r}; allowed: {self.names}"
                )
        order: list[int] = []
        state: dict[int, int] = {}  # 1 = visiting, 2 = done

        def visit(k: int, path: list[str]) -> None:
            if state.get(k) == 2:
                return
            if state.get(k) == 1:
                cycle = path[path.index(self.names[k]) :] + [self.names[k]]
                raise ValueError(f"reward {self.names[k]!r}: conditions form a cycle: {' -> '.join(cycle)}")
            state[k] = 1
            cond = self.conditions[k]
            if cond is not None:
                visit(self.names.index(cond[0]), path + [self.names[k]])
            state[k] = 2
            if cond is not None:
                order.append(k)

        for k in range(len(self.names)):
            visit(k, [])
        return order

    # -- pool -------------------------------------------------------------------------------------------

    def start(self) -> "RewardBank":
        """Start the workers now (otherwise the first `score` does)."""
        if not self._workers:
            if self._start_method == "fork":
                # Warm caches (e.g. math-verify's parser) once here, so every forked worker has them.
                for fn in self._fns:
                    warm = getattr(fn, "warmup", None)
                    if callable(warm):
                        try:
                            warm()
                        except Exception:  # noqa: BLE001
                            pass
            refs = self._fns if self._start_method == "fork" else self._refs
            self._refs_for_workers = refs
            self._workers = [self._new_worker() for _ in range(self.num_workers)]
        return self

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self._refs_for_workers, self.worker_memory_mb, self.allow_unsandboxed)

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        new = self._new_worker()
        self._workers[self._workers.index(w)] = new
        return new

    def close(self) -> None:
        """Stop the workers (killing any that do not exit within a second)."""
        workers, self._workers = self._workers, []
        for w in workers:
            w.stop()
        deadline = time.monotonic() + 1.0
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            w.kill()  # also when it exited: its guard and anything its rewards left in its group go too

    def __enter__(self) -> "RewardBank":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- scoring ----------------------------------------------------------------------------------------

    def _fail(self, k: int, start: int, stop: int, raw: np.ndarray, counter: dict, what: str) -> None:
        name = self.names[k]
        raw[start:stop, k] = self.fallbacks[k]
        counter[name] += stop - start
        if name not in self._logged:
            self._logged.add(name)
            log.warning("reward %r: %s; its rollouts get the fallback %s (logged once per reward)",
                        name, what, self.fallbacks[k])
        else:
            log.debug("reward %r: %s", name, what)

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_lengths: Optional[Sequence[int]] = None,
        columns: Optional[Mapping[str, Sequence[Any]]] = None,
    ) -> RewardResult:
        """Score a batch; every column of `columns` must have one entry per completion."""
        t_start = time.perf_counter()
        n = len(completions)
        prompts = list(prompts)
        completions = list(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        lengths = None if completion_lengths is None else [int(x) for x in completion_lengths]
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} completion_lengths for {n} completions")
        columns = dict(columns or {})
        for key, col in columns.items():
            if key in _RESERVED:
                raise ValueError(f"column {key!r} collides with a reward argument; rename it")
            if len(col) != n:
                raise ValueError(f"column {key!r} has {len(col)} entries for {n} completions")
        K = len(self.names)
        raw = np.full((n, K), np.nan, dtype=np.float64)
        seconds = {name: 0.0 for name in self.names}
        errors = {name: 0 for name in self.names}
        timeouts = {name: 0 for name in self.names}
        memory = {name: 0 for name in self.names}
        if n:
            self._run(prompts, completions, lengths, columns, raw, seconds, errors, timeouts, memory)
        for k in self._order:
            on, threshold = self.conditions[k]  # type: ignore[misc]
            gate = raw[:, self.names.index(on)]
            with np.errstate(invalid="ignore"):
                closed = ~(gate >= threshold)  # NaN gate: condition not reached
            raw[closed & ~np.isnan(raw[:, k]), k] = 0.0
        return RewardResult(
            matrix=torch.from_numpy(raw.astype(np.float32)),
            names=list(self.names),
            weights=list(self.weights),
            seconds=seconds,
            errors=errors,
            timeouts=timeouts,
            wall_s=time.perf_counter() - t_start,
            nans={name: int(np.isnan(raw[:, k]).sum()) for k, name in enumerate(self.names)},
            memory=memory,
        )

    def _tasks(self, n: int) -> deque:
        per_reward = []
        for k, fn in enumerate(self._fns):
            size = min(self.chunk_size, int(getattr(fn, "rows_per_call", self.chunk_size)) or 1)
            size = max(1, min(size, math.ceil(n / self.num_workers)))
            per_reward.append([(k, a, min(a + size, n)) for a in range(0, n, size)])
        # Interleave rewards so a slow one does not start last and set the batch's critical path.
        tasks: deque = deque()
        for i in range(max(len(p) for p in per_reward)):
            for p in per_reward:
                if i < len(p):
                    tasks.append(p[i])
        return tasks

    def _run(self, prompts, completions, lengths, columns, raw, seconds, errors, timeouts, memory) -> None:
        """Spread the (reward, row range) tasks over the workers; every task ends scored, failed or timed out."""
        self.start()
        tasks = self._tasks(len(completions))
        idle = list(self._workers)
        busy: list[_Worker] = []
        tally = (raw, seconds, errors, timeouts, memory)
        inputs = (prompts, completions, lengths, columns)
        send_failures = 0
        ok = False
        try:
            while tasks or busy:
                send_failures = self._dispatch(tasks, idle, busy, inputs, tally, send_failures)
                if not busy:
                    continue
                wait_s = max(0.0, min(w.task[4] for w in busy) - time.monotonic())  # type: ignore[index]
                if self.worker_memory_mb:
                    wait_s = min(wait_s, 0.1)  # poll the workers' memory while they work
                ready = set(_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], wait_s))
                now = time.monotonic()
                for w in list(busy):
                    self._check(w, ready, now, busy, idle, tally)
            ok = True
        finally:
            if not ok:
                # Interrupted mid-batch (Ctrl-C...): results still in flight would confuse the next batch.
                for w in busy:
                    self._replace(w)

    def _dispatch(self, tasks: deque, idle: list, busy: list, inputs: tuple, tally: tuple, send_failures: int) -> int:
        """Send tasks to idle workers; returns the running count of failed sends."""
        prompts, completions, lengths, columns = inputs
        raw, errors = tally[0], tally[2]
        while tasks and idle:
            w = idle.pop()
            k, a, b = tasks.popleft()
            self._task_id += 1
            msg = (self._task_id, k, prompts[a:b], completions[a:b], None if lengths is None else lengths[a:b],
                   {key: col[a:b] for key, col in columns.items()}, self.kwargs[k])
            try:
                w.conn.send(msg)
            except (BrokenPipeError, ConnectionError, EOFError, OSError) as e:
                # The worker died while idle: not this task's fault, so retry it on a new one.
                idle.append(self._replace(w))
                send_failures += 1
                if send_failures > 2 * self.num_workers:
                    self._fail(k, a, b, raw, errors, f"could not reach a worker: {e!r}")
                else:
                    tasks.appendleft((k, a, b))
                continue
            except Exception as e:  # noqa: BLE001 - the rows themselves do not pickle
                self._fail(k, a, b, raw, errors, f"its inputs could not be sent to a worker: {e!r}")
                idle.append(w)
                continue
            now = time.monotonic()
            w.task = (self._task_id, k, a, b, now + self.timeout_s, now)
            busy.append(w)
        return send_failures

    def _check(self, w: _Worker, ready: set, now: float, busy: list, idle: list, tally: tuple) -> None:
        """One busy worker: take its reply, or fail its task (died, over its memory cap, past the timeout)."""
        raw, seconds, errors, timeouts, memory = tally
        task_id, k, a, b, deadline, t0 = w.task  # type: ignore[misc]
        if w.conn in ready or w.proc.sentinel in ready:
            try:
                reply = w.conn.recv() if w.conn.poll() else None
            except (EOFError, OSError):
                reply = None
            busy.remove(w)
            if reply is None or reply[0] != task_id:
                w.proc.join(1.0)  # reap it, to report how it ended
                seconds[self.names[k]] += now - t0
                self._fail(k, a, b, raw, errors, f"its worker died (exit code {w.proc.exitcode})")
                idle.append(self._replace(w))
                return
            w.task = None
            _, status, payload, dt = reply
            seconds[self.names[k]] += dt
            if status == "ok":
                try:
                    raw[a:b, k] = _to_values(payload, b - a)
                except ValueError as e:
                    self._fail(k, a, b, raw, errors, f"bad output: {e}")
                idle.append(w)
            elif status == "memory":
                self._fail(k, a, b, raw, memory, f"went over worker_memory_mb={self.worker_memory_mb}")
                idle.append(self._replace(w))  # its heap is spent: start clean
            else:
                self._fail(k, a, b, raw, errors, f"raised an exception:\n{payload}")
                idle.append(w)
        elif self.worker_memory_mb and _private_mb(w.proc.pid) > self.worker_memory_mb:
            busy.remove(w)
            seconds[self.names[k]] += now - t0
            self._fail(k, a, b, raw, memory, f"its worker went over worker_memory_mb={self.worker_memory_mb}")
            idle.append(self._replace(w))
        elif now >= deadline:
            busy.remove(w)
            seconds[self.names[k]] += now - t0
            self._fail(k, a, b, raw, timeouts, f"a call on {b - a} rollouts exceeded {self.timeout_s}s")
            idle.append(self._replace(w))
