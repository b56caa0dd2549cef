"""Measurement helpers shared by the benchmarks in `bench/`.

* `reexec_with_jemalloc` / `allocator_status`: run the benchmark under jemalloc (the README's method: page faults are
  expensive on these VMs, and glibc malloc made timings jump 3-15x at random).
* `interleaved` + `ForeignLoad`: paired timing of several variants in one process, in rotating order, after a warm-up,
  keeping only rounds during which no other process competed for the cores.
* `summarize` / `paired_ratios`: medians with 25th/75th percentiles.
* `allocated_bytes`: bytes requested from PyTorch's CPU allocator (torch profiler with `profile_memory=True`), split at
  a wall-clock instant so that one profiled call can be cut into phases (e.g. prefill / decode).
* `WORKLOAD` + `add_workload_args`: the benchmark workload beside this file (`bench/workload/README.md`), every
  script's default.
* `run_fresh` + `vm_hwm_bytes`: peak RSS of one fresh subprocess (the child reports its own `VmHWM`; `ru_maxrss`
  from `os.wait4` is kept for reference but inherits the forking parent's high-water mark).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# the benchmark workload (config.json, processor/, completions.jsonl), wherever the scripts are run from
WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workload")
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")
JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
_REEXEC_MARK = "PADT_BENCH_REEXEC"


def add_workload_args(parser: Any) -> None:
    """`--config` and `--processor` (an `argparse.ArgumentParser`'s), defaulting to the workload beside this file."""
    parser.add_argument("--config", default=WORKLOAD,
                        help="folder with the bench config.json (default: bench/workload)")
    parser.add_argument("--processor", default=os.path.join(WORKLOAD, "processor"),
                        help="folder with tokenizer + image config (default: bench/workload/processor)")


# ============================================================================ allocator
def find_jemalloc(paths: Sequence[str] = JEMALLOC_PATHS) -> str | None:
    """Path of the first existing libjemalloc shared object, or None."""
    return next((p for p in paths if os.path.isfile(p)), None)


def jemalloc_loaded() -> bool:
    """True when libjemalloc is mapped into this process (Linux `/proc/self/maps`)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return "libjemalloc" in f.read()
    except OSError:
        return False


def reexec_with_jemalloc(enabled: bool = True) -> None:
    """Re-exec the current script once with jemalloc preloaded (`LD_PRELOAD`, `MALLOC_CONF=JEMALLOC_CONF`).

    Does nothing when jemalloc is already loaded, when it is not installed (`allocator_status` then says so), when
    `enabled` is False, or after one re-exec (so it can never loop). Call it first thing in `main()`, before torch is
    imported, so the child process does not pay for the parent's imports.
    """
    if not enabled or jemalloc_loaded() or os.environ.get(_REEXEC_MARK):
        return
    lib = find_jemalloc()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def allocator_status() -> str:
    """One line naming the malloc this process runs under."""
    if jemalloc_loaded():
        return f"jemalloc (MALLOC_CONF={os.environ.get('MALLOC_CONF', '<unset>')})"
    if find_jemalloc() is None:
        return ("glibc malloc: jemalloc NOT found (apt-get install -y libjemalloc2); timings are noisier and not "
                "comparable with the authors'")
    return "glibc malloc: jemalloc disabled on request"


# ============================================================================ statistics
@dataclass
class Summary:
    """Median and quartiles of a sample."""

    median: float
    p25: float
    p75: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Median, 25th and 75th percentiles (inclusive method, so 1-2 values work) of `values`."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize() needs at least one value")
    if len(xs) == 1:
        return Summary(xs[0], xs[0], xs[0], 1)
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return Summary(q2, q1, q3, len(xs))


def median_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of `values` (rounds resampled with replacement).

    The quartiles say how much single rounds scatter; this says how well the median itself is pinned down, which is
    what a target on the median needs (e.g. decode 1.022 with 95 % CI [1.013, 1.032] over 300 rounds)."""
    import random

    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("median_ci() needs at least one value")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[int((1 - tail) * (resamples - 1))]


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Element-wise `numerator[i] / denominator[i]` of two equally long paired samples."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired samples differ in length: {len(numerator)} vs {len(denominator)}")
    return [a / b for a, b in zip(numerator, denominator)]


# ============================================================================ competing load
def _system_busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (`/proc/stat`, all cores), or None without /proc."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ForeignLoad:
    """Context manager: how many cores *other* processes kept busy, on average, while the block ran.

    System-wide busy CPU time (`/proc/stat`) minus this process's own user+system time, over the wall time (resolution
    one clock tick, 10 ms, per core). About 0 on an idle machine; near the core count when the block competed for every
    core. `cores` is None where /proc is missing.
    """

    def __enter__(self) -> ForeignLoad:  # noqa: PYI034
        self.cores: float | None = None
        self._wall, self._busy, self._own = time.perf_counter(), _system_busy_seconds(), _own_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _system_busy_seconds()
        wall = time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            self.cores = max(0.0, ((busy - self._busy) - (_own_cpu_seconds() - self._own)) / wall)


# ============================================================================ paired timing
@dataclass
class Interleaved:
    """Result of `interleaved`: per variant, per measurement, one value per round (paired by index across variants),
    with how many cores other processes kept busy during each round and whether the round was accepted."""

    values_all: dict[str, dict[str, list[float]]]
    foreign_cores: list[float | None]
    accepted: list[bool]
    seconds: float

    def values(self, accepted_only: bool = True) -> dict[str, dict[str, list[float]]]:
        """The measurements of the accepted rounds (or of all rounds)."""
        keep = [a or not accepted_only for a in self.accepted]
        return {
            v: {k: [x for x, ok in zip(xs, keep) if ok] for k, xs in d.items()} for v, d in self.values_all.items()
        }

    @property
    def n_accepted(self) -> int:
        return sum(self.accepted)


def interleaved(
    runs: dict[str, Callable[[], dict[str, float]]],
    reps: int,
    warmup: int = 1,
    collect_garbage: bool = True,
    max_foreign_cores: float | None = None,
    max_seconds: float | None = None,
) -> Interleaved:
    """Run every variant `warmup` times, then rounds in rotating order (round r starts with variant r mod k).

    Each run returns a dict of named measurements (e.g. `{"prefill_s": ..., "decode_s": ...}`). A round is accepted
    when other processes kept at most `max_foreign_cores` cores busy during it (`ForeignLoad`; always accepted when
    None or /proc is missing): a competing process on a 2-core VM slows OpenMP regions 3-15x at random, which no
    median fixes. Without `max_seconds`, exactly `reps` rounds run; with it, rounds go on until `reps` were accepted
    or `max_seconds` have passed (at least `min(reps, 3)` rounds).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    values: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    foreign: list[float | None] = []
    accepted: list[bool] = []
    start = time.perf_counter()
    r = 0
    while sum(accepted) < reps:
        if max_seconds is None and r >= reps:
            break
        if max_seconds is not None and r >= min(reps, 3) and time.perf_counter() - start > max_seconds:
            break
        k = r % len(names)
        with ForeignLoad() as load:
            for name in names[k:] + names[:k]:
                if collect_garbage:
                    gc.collect()
                for key, value in runs[name]().items():
                    values[name].setdefault(key, []).append(float(value))
        foreign.append(load.cores)
        accepted.append(max_foreign_cores is None or load.cores is None or load.cores <= max_foreign_cores)
        r += 1
    return Interleaved(values, foreign, accepted, time.perf_counter() - start)


class StopWatch:
    """`time.perf_counter` marks; `lap()` returns seconds since the previous mark."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


# ============================================================================ allocator bytes
@dataclass
class AllocatorBytes:
    """Positive allocation requests to PyTorch's CPU allocator seen by the profiler, before/after a split instant, and
    the number of profiled operator events (aten ops, nested ones included) in the same two phases."""

    bytes_before: int
    allocs_before: int
    bytes_after: int
    allocs_after: int
    ops_before: int = 0
    ops_after: int = 0


def allocated_bytes(
    fn: Callable[[], Any], split_ns: Callable[[], int | None] | None = None
) -> tuple[Any, AllocatorBytes]:
    """Run `fn()` under `torch.profiler` (CPU, `profile_memory=True`) and add up the sizes of all allocations.

    Args:
        fn: the work to measure; its return value is passed through.
        split_ns: called after `fn`, returns a `time.time_ns()` instant (the profiler's clock) at which to split the
            allocations, e.g. the end of the prefill; `None` (or returning None) puts everything in `bytes_before`.
    Returns:
        `(fn(), AllocatorBytes)`. Frees (negative records) are ignored: this is the traffic asked of the allocator,
        not the live set. The operator counts are a load-independent proxy for per-call dispatch overhead.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    split = None if split_ns is None else split_ns()
    counts = [0, 0, 0, 0]
    ops = [0, 0]
    for event in prof.profiler.kineto_results.events():
        after = split is not None and event.start_ns() >= split
        if event.name() != "[memory]":
            ops[after] += 1
        elif event.nbytes() > 0:
            counts[2 * after] += event.nbytes()
            counts[2 * after + 1] += 1
    return result, AllocatorBytes(*counts, *ops)


# ============================================================================ fresh-process memory
def vm_hwm_bytes() -> int | None:
    """This process's peak resident set (`VmHWM` of `/proc/self/status`), or None where /proc is missing.

    Unlike `ru_maxrss`, it belongs to the process's own address space: Linux carries the pre-exec high-water mark of
    the forking parent into `ru_maxrss` (`execve` keeps the maximum), so a child started by a 1 GB benchmark reports at
    least 1 GB there however little it uses. Call it in the child, at its end.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def self_ru_maxrss_bytes() -> int:
    """`ru_maxrss` of this process in bytes (Linux reports kilobytes; see `vm_hwm_bytes` for its caveat)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_fresh(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300.0) -> tuple[int, str]:
    """Run `argv` as a fresh process; return `(its ru_maxrss in bytes as seen by os.wait4, its stdout)`.

    The `ru_maxrss` is the child's own (not `RUSAGE_CHILDREN`, a maximum over all children), but includes the parent's
    high-water mark inherited through fork/exec (see `vm_hwm_bytes`): have the child print `vm_hwm_bytes()` for its
    true peak. Raises `RuntimeError` with the child's stderr when it fails, `subprocess.TimeoutExpired` on timeout.
    """
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = _read_all(proc, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}:\n{stderr[-4000:]}")
    return int(usage.ru_maxrss) * 1024, stdout


def _read_all(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Drain both pipes without reaping the child (so `os.wait4` can still read its rusage)."""
    import threading

    chunks: dict[str, str] = {}

    def drain(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise subprocess.TimeoutExpired(proc.args, timeout)
    return chunks.get("out", ""), chunks.get("err", "")


def last_json_line(text: str) -> dict:
    """The last line of `text` that parses as a JSON object (child processes print their result that way)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON object line in child output:\n{text[-2000:]}")


def fmt_bytes(n: float) -> str:
    """`1234567` -> `'1.23 MB'` (decimal units, as the authors' README)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    """Seconds as ms with 2 decimals."""
    return f"{s * 1e3:.2f} ms"


# --------------------------------------------------------------------------- the two models of a benchmark
def build_padt_model(config_dir: str, seed: int, vis_norm_mean: float):
    """The PaDT model of a bench config: random weights from `seed`, fp32, sdpa.

    A fresh PaDT model starts with `vis_norm` at exactly zero (all prototypes 0); here its weight is drawn from
    N(`vis_norm_mean`, initializer_range) and its bias from N(0, initializer_range), as after training, so the VRT
    logits have a realistic scale.
    """
    import torch

    from padt import PaDTConfig, PaDTForConditionalGeneration

    config = PaDTConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = PaDTForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if model.vis_norm is not None:
        std = config.text_config.initializer_range
        with torch.no_grad():
            model.vis_norm.weight.normal_(vis_norm_mean, std)
            model.vis_norm.bias.normal_(0.0, std)
    return model


def build_vanilla_model(config_dir: str, seed: int, base_state: dict | None = None):
    """transformers' `Qwen2_5_VLForConditionalGeneration` of the same config, fp32, sdpa; with `base_state` (a PaDT
    state dict) its weights are copied from it (`ValueError` if a vanilla weight is missing or a non-PaDT key is left)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from padt.model.modeling import PADT_MODULE_NAMES

    config = Qwen2_5_VLConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if base_state is not None:
        result = model.load_state_dict(base_state, strict=False)
        stray = [k for k in result.unexpected_keys if k.split(".")[0] not in PADT_MODULE_NAMES]
        if result.missing_keys or stray:
            raise ValueError(f"vanilla/PaDT state dicts do not line up: missing {result.missing_keys[:5]}, "
                             f"unexpected non-PaDT keys {stray[:5]}")
    return model
