"""Fused Triton kernels for the full mode's all-experts norms (CUDA, bf16/fp16, SiLU-gated fused experts).

For every expert e and token t:  ||E_e(x_t)|| = || down_e( silu(x_t G_e^T) * (x_t U_e^T) ) ||, with
gate_up_proj [E, 2I, H] (G_e = rows :I, U_e = rows I:) and down_proj [E, H, I], every intermediate
rounded to the model's dtype exactly where transformers' own experts round it (the matmul outputs, the
activation, the product), norms accumulated in float32.

* ``_gate_up_act``: per (expert, token tile, intermediate tile) two accumulators (gate rows and up
  rows of the same columns); the epilogue writes the activation act[e, t, :] straight away, so the
  [E, T, 2I] matmul output never reaches memory.
* ``_down_sq``: per (expert, token tile, hidden tile) the down projection; the epilogue rounds to the
  dtype, squares and sums the tile's columns into partial[e, tile, t]; the [E, T, H] output never
  reaches memory.  The partial sums are added by PyTorch (deterministic order).

Used by ``FusedGateUpFamily.all_expert_norms`` through ``fastest``: the first call of a process is
checked against the PyTorch bmm path (the reference), and per expert shape both are timed (best of
three) on a chunk and the faster is kept (on an H100 the kernels win at the 30B-A3B shape, cuBLAS at
235B-A22B's).  REAP_FULL_KERNEL=triton / torch forces one.  reap.py does all that ahead, on scratch
experts of the model's shape while the model loads (``KernelWarmUp``, from ``reap_vlm.score.warmup``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)
_state = {"checked": False, "broken": None}  # process-wide: first use is checked against the PyTorch path
_choice: dict[tuple, str] = {}  # per expert shape, dtype, device: "triton" or "bmm", whichever timed faster
_MIN_TIMED_ROWS = 1024  # below this a timing says little; such calls take the kernels, undecided
_TIMED_RUNS = 5  # runs per autotuning config
_RACE_RUNS = 3  # runs of each path when racing the kernels against bmm
_MIN_BN = 64  # the narrowest hidden tile among _down_sq's configs: its partial sums are sized for it
_CHECKED_ROWS = 64  # rows of the first call checked against the PyTorch path
_LAST_BUCKET = 14  # calls on 8,192 rows or more share their autotuning
_COMPILING_THREADS = 8

try:  # pragma: no cover - depends on the installation
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def available(experts, x: torch.Tensor) -> bool:
    """Whether the fused kernels apply: CUDA, 16-bit floats, SiLU-gated fused experts, contiguous weights,
    Triton importable, and not turned off with REAP_FULL_KERNEL=torch."""
    config = getattr(experts, "config", None)
    if not can_run(x.dtype, x.device.type, getattr(config, "hidden_act", None)):
        return False
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if gate_up is None or down is None or gate_up.dtype != x.dtype or down.dtype != x.dtype:
        return False
    if not (gate_up.is_contiguous() and down.is_contiguous()):
        return False
    if getattr(experts, "has_bias", False) or not getattr(experts, "is_concatenated", True):
        return False
    if getattr(experts, "is_transposed", False):
        return False
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is not None:  # transformers' default gate (silu(gate) * up) is the one fused here
        from transformers.integrations.moe import _default_apply_gate

        if gate is not _default_apply_gate:
            return False
    return True


def can_run(dtype: torch.dtype, device_type: str, hidden_act: str | None) -> bool:
    """What ``available`` asks of the run rather than of the experts module: Triton importable and not turned off
    (REAP_FULL_KERNEL=torch, or a failed check), CUDA, 16-bit floats, a SiLU gate."""
    if triton is None or _state["broken"] or os.environ.get("REAP_FULL_KERNEL", "auto") == "torch":
        return False
    return device_type == "cuda" and dtype in (torch.bfloat16, torch.float16) and hidden_act in ("silu", "swish")


def _time_config(kernel_call, quantiles=None) -> list[float]:
    """The autotuner's benchmarker: the ``quantiles`` (default: the median) of ``kernel_call``'s milliseconds.
    Triton's own ``do_bench`` allocates a 256 MB buffer to flush the L2 cache between runs, which lands
    on the peak GPU memory of the first call at every new token count; flushing buys nothing here, as
    every call streams all experts' weights (hundreds of MB) through the L2 anyway."""
    kernel_call()
    ranked = torch.tensor([_seconds(kernel_call) * 1e3 for _ in range(_TIMED_RUNS)], dtype=torch.float64)
    return [float(ranked.quantile(q)) for q in (quantiles or (0.5,))]


if triton is not None:
    # Autotuning's choice kept on disk beside the compiled kernels (TRITON_CACHE_DIR; Triton keys it by the GPU
    # architecture, the kernel's source, the configs and the shapes): a later process on the machine reuses it
    # instead of timing every config again at every token bucket.
    _TUNING = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    # Token counts are not specialized on (Triton would compile every config twice, for counts that are multiples
    # of 16 and for the others): rows are masked and the tiles' loads run along the hidden size; only the small
    # store of the partial sums runs along the tokens.
    _ANY_COUNT = ["T", "T_BUCKET"]

    def _configs(wide: bool):
        configs = [
            triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        ]
        if wide:  # one accumulator: room for 128 x 256 tiles
            configs.append(triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3))
        return configs

    @triton.jit
    def _block(T, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's output tile of a [T, N] result: its column-tile index and its row and column
        offsets.  Tiles go in groups of GROUP_M row tiles, so neighbouring programs share weight columns."""
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(T, BM), tl.cdiv(N, BN)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % group) % size_m)
        pid_n = (pid % group) // size_m
        return pid_n, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN)

    @triton.autotune(configs=_configs(False), key=["H", "INTER", "T_BUCKET"], do_bench=_time_config,
                     **_TUNING)
    @triton.jit(do_not_specialize=_ANY_COUNT)
    def _gate_up_act(x_ptr, w_ptr, act_ptr, T, H, INTER, stride_xt, T_BUCKET,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        e = tl.program_id(1).to(tl.int64)
        _, offs_m, offs_n = _block(T, INTER, BM, BN, GROUP_M)
        offs_k = tl.arange(0, BK)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :]
        w_base = w_ptr + e * (2 * INTER * H)
        g_ptrs = w_base + offs_n[None, :] * H + offs_k[:, None]  # [BK, BN] of G_e^T
        u_ptrs = g_ptrs + INTER * H
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        m_ok = offs_m[:, None] < T
        n_ok = offs_n[None, :] < INTER
        for k in range(0, tl.cdiv(H, BK)):
            k_left = H - k * BK
            x = tl.load(x_ptrs, mask=m_ok & (offs_k[None, :] < k_left), other=0.0)
            wg = tl.load(g_ptrs, mask=(offs_k[:, None] < k_left) & n_ok, other=0.0)
            wu = tl.load(u_ptrs, mask=(offs_k[:, None] < k_left) & n_ok, other=0.0)
            acc_g = tl.dot(x, wg, acc_g)
            acc_u = tl.dot(x, wu, acc_u)
            x_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
        dt = act_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)
        u = acc_u.to(dt).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        a = (s * u).to(dt)
        out = act_ptr + e * T * INTER + offs_m[:, None] * INTER + offs_n[None, :]
        tl.store(out, a, mask=m_ok & n_ok)

    @triton.autotune(configs=_configs(True), key=["H", "INTER", "T_BUCKET"], do_bench=_time_config,
                     **_TUNING)
    @triton.jit(do_not_specialize=_ANY_COUNT)
    def _down_sq(act_ptr, w_ptr, part_ptr, T, H, INTER, part_tiles, T_BUCKET,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        e = tl.program_id(1).to(tl.int64)
        pid_n, offs_m, offs_n = _block(T, H, BM, BN, GROUP_M)
        offs_k = tl.arange(0, BK)
        a_ptrs = act_ptr + e * T * INTER + offs_m[:, None] * INTER + offs_k[None, :]
        w_ptrs = w_ptr + e * (H * INTER) + offs_n[None, :] * INTER + offs_k[:, None]  # [BK, BN] of D_e^T
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        m_ok = offs_m[:, None] < T
        n_ok = offs_n[None, :] < H
        for k in range(0, tl.cdiv(INTER, BK)):
            k_left = INTER - k * BK
            a = tl.load(a_ptrs, mask=m_ok & (offs_k[None, :] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & n_ok, other=0.0)
            acc = tl.dot(a, w, acc)
            a_ptrs += BK
            w_ptrs += BK
        y = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
        y = tl.where(n_ok, y, 0.0)
        sq = tl.sum(y * y, axis=1)
        tl.store(part_ptr + (e * part_tiles + pid_n) * T + offs_m, sq, mask=offs_m < T)


def all_expert_norms(experts, x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """[T, E] float32 norms of every expert's output on every row of x (see the module doc).
    ``config`` (BM, BN, BK, GROUP_M, num_warps, num_stages) skips autotuning (tests, the interpreter)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    num, two_i, hidden = gate_up.shape
    inter = two_i // 2
    tokens = x.shape[0]
    x = x.contiguous()
    act = torch.empty(num, tokens, inter, dtype=x.dtype, device=x.device)

    def grid_act(m):
        return (triton.cdiv(tokens, m["BM"]) * triton.cdiv(inter, m["BN"]), num)

    up_kernel, down_kernel, meta = _gate_up_act, _down_sq, {}
    if config is not None:
        up_kernel, down_kernel, meta = _gate_up_act.fn, _down_sq.fn, dict(config)
    bucket = bucket_of(tokens)
    up_kernel[grid_act](x, gate_up, act, tokens, hidden, inter, x.stride(0), bucket, **meta)
    max_tiles = triton.cdiv(hidden, _MIN_BN)
    part = torch.zeros(num, max_tiles, tokens, dtype=torch.float32, device=x.device)

    def grid_down(m):
        return (triton.cdiv(tokens, m["BM"]) * triton.cdiv(hidden, m["BN"]), num)

    down_kernel[grid_down](act, down, part, tokens, hidden, inter, max_tiles, bucket, **meta)
    # Only the tiles of the config that ran: autotuning also ran configs with narrower tiles, whose
    # extra partial sums are still in the buffer.
    width = meta["BN"] if config is not None else _down_sq.best_config.kwargs["BN"]
    return part[:, :triton.cdiv(hidden, width)].sum(dim=1).sqrt_().T


def checked_norms(experts, x: torch.Tensor, reference) -> torch.Tensor | None:
    """``all_expert_norms``, the first call of the process checked against ``reference(experts, x)`` (the
    PyTorch path) on a few rows; None (and the kernels off for good) when they fail or disagree."""
    try:
        if not _state["checked"]:
            probe = x[:_CHECKED_ROWS]
            got, ref = all_expert_norms(experts, probe), reference(experts, probe)
            err = float(((got - ref).abs() / ref.abs().clamp(min=1e-30)).max())
            _state["checked"] = True
            if not err <= 2e-2:  # bf16 rounding of the intermediates lands far below this
                raise RuntimeError(f"fused kernels disagree with the PyTorch path (max rel err {err:.2e})")
        return all_expert_norms(experts, x)
    except torch.OutOfMemoryError:  # the memory's fault, not the kernels'
        raise
    except Exception as exc:  # a compiler or driver problem must not stop the scoring
        _state["broken"] = str(exc)
        log.warning("fused Triton expert kernels off, using batched matmuls: %s", exc)
        return None


def gpu_identity(device) -> str | None:
    """The GPU ``device`` ("cuda:N") names, model and compute capability; None where there is no such GPU."""
    if not isinstance(device, str) or not device.startswith("cuda:") or not device[5:].isdigit():
        return None
    index = int(device[5:])
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def tuning() -> dict:
    """This process's timed choices, JSON-able (a resume state keeps them): the path per expert shape, dtype and
    device (``fastest``'s race), and each kernel's autotuned config per key, with the GPUs they were timed on (those
    of the paths, and the current one where CUDA has started) and the Triton.  Both pick how the norms are rounded,
    so a resumed run that timed again could round otherwise."""
    devices = {device for _, _, device in _choice}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # no CUDA started for a run on the CPU
        devices.add(f"cuda:{torch.cuda.current_device()}")
    record: dict = {"gpus": {device: gpu_identity(device) for device in sorted(devices)},
                    "paths": [[list(shape), str(dtype), device, path] for (shape, dtype, device), path
                              in _choice.items()]}
    if triton is not None:
        record["triton"] = triton.__version__
        record["configs"] = {kernel.base_fn.__name__: [[list(key), config.all_kwargs()]
                                                       for key, config in kernel.cache.items()]
                             for kernel in (_gate_up_act, _down_sq)}
    return record


def use_tuning(record: dict) -> int:
    """Take the choices of ``tuning``'s ``record`` (a resumed run's: before its first call, and over any the
    warm-up timed) where they were timed on the same GPUs and Triton; returns how many were taken.  Others (another
    GPU, Triton or kernel's configs) are left alone and timed again; a damaged record is taken not at all."""
    if not record:  # nothing saved (a state from before choices were saved)
        return 0
    try:
        paths, configs = _read_tuning(record)
    except Exception as exc:  # a damaged file's: whatever it is, timing again is safe
        log.warning("the saved kernel choices cannot be read (%s); timing them again", exc)
        return 0
    if paths is None:
        log.warning("the saved kernel choices were timed on other GPUs (%s); timing them again", record.get("gpus"))
        return 0
    _choice.update(paths)
    for kernel, key, config in configs:
        kernel.cache[key] = config
    return len(paths) + len(configs)


def _read_tuning(record: dict) -> tuple[dict | None, list]:
    """``use_tuning``'s record read whole before anything is taken: (paths, or None when timed on other GPUs,
    [(kernel, key, config)] of the configs this Triton and these kernels have)."""
    gpus = record.get("gpus")
    if not isinstance(gpus, dict) or any(gpu_identity(device) != identity for device, identity in gpus.items()):
        return None, []
    paths = {(tuple(shape), getattr(torch, dtype.removeprefix("torch.")), device): path
             for shape, dtype, device, path in record.get("paths", [])}
    if not all(isinstance(dtype, torch.dtype) and path in ("triton", "bmm") for (_, dtype, _), path in paths.items()):
        raise ValueError("unknown dtype or path")
    configs = []
    if triton is not None and record.get("triton") == triton.__version__:
        for kernel in (_gate_up_act, _down_sq):
            by_value = {json.dumps(c.all_kwargs(), sort_keys=True): c for c in kernel.configs}
            for key, kwargs in record.get("configs", {}).get(kernel.base_fn.__name__, []):
                config = by_value.get(json.dumps(kwargs, sort_keys=True))
                if config is not None:
                    configs.append((kernel, tuple(key), config))
    return paths, configs


def bucket_of(rows: int) -> int:
    """The autotuning's key for a call on ``rows`` rows: tuned once per power-of-two row count up to 8,192; above,
    one bucket (the grid holds thousands of tiles per expert there, and one config serves all)."""
    return min(max(rows, 1).bit_length(), _LAST_BUCKET)


def token_buckets(counts, chunk: int) -> dict[int, int]:
    """The autotuning buckets calls on ``counts`` rows (each cut into chunks of ``chunk``) fall into, each with
    the largest count that falls into it: {bucket: rows}."""
    buckets: dict[int, int] = {}
    for count in counts:
        for rows in {min(count, chunk), count % chunk} - {0}:
            bucket = bucket_of(rows)
            buckets[bucket] = max(buckets.get(bucket, 0), rows)
    return buckets


def tuning_plan(shape: tuple[int, int, int], dtype: torch.dtype, counts: list[int], reference_bytes_per_row: int,
                chunk: int, room_bytes: int) -> tuple[int, list[int]]:
    """What to run ahead on scratch experts of ``shape`` ([E, 2I, H]) for calls on batches of ``counts`` rows (each
    cut into chunks of ``chunk``, as ``norms.all_expert_norms`` cuts them): (the first call's rows, for its check
    against the bmm path and its race with it, which tune its bucket, its 64-row check's and its probe's; 0 where it
    does not fit in ``room_bytes``), and one count per other bucket the calls use, the largest, ascending, as far as
    each fits."""
    first = min(counts[0], chunk) if counts else 0
    if not first or scratch_bytes(shape, first, dtype) > room_bytes:
        first = 0
    probe = _probe_rows(shape, first, dtype, reference_bytes_per_row)
    raced = {bucket_of(n) for n in (first, _CHECKED_ROWS, probe if probe >= _MIN_TIMED_ROWS else first)}
    buckets = token_buckets(counts, chunk)
    rows = [n for b, n in sorted(buckets.items()) if not (first and b in raced)]
    return first, [n for n in rows if scratch_bytes(shape, n, dtype) <= room_bytes]


def scratch_bytes(shape: tuple[int, int, int], rows: int, dtype: torch.dtype) -> int:
    """Memory of scratch experts of ``shape`` ([E, 2I, H]) and one call on ``rows`` rows (x, act, partial sums)."""
    num, two_i, hidden = shape
    size = torch.finfo(dtype).bits // 8
    return num * (two_i * hidden + hidden * two_i // 2) * size + rows * (hidden * size + _row_bytes(shape, dtype))


@dataclass
class KernelWarmUp:
    """What a process's first calls of ``fastest`` would do on experts of ``shape`` ([E, 2I, H]), done ahead (on a
    side thread while the model loads): ``compile`` both kernels for every autotuning config on each of ``devices``,
    then ``tune`` them on scratch experts.  ``reference``: the bmm path, (experts, x) -> [T, E] norms, and its working
    memory per row."""

    shape: tuple[int, int, int]
    dtype: torch.dtype
    devices: list[torch.device]
    reference: Callable
    reference_bytes_per_row: int

    def compile(self) -> dict:
        _, two_i, hidden = self.shape
        inter = two_i // 2
        with ThreadPoolExecutor(_COMPILING_THREADS, thread_name_prefix="reap-triton") as pool:
            for device in self.devices:
                with torch.cuda.device(device), triton.AsyncCompileMode(pool):
                    _gate_up_act.warmup(self.dtype, self.dtype, self.dtype, 1, hidden, inter, hidden, 1, grid=(1,))
                    _down_sq.warmup(self.dtype, self.dtype, torch.float32, 1, hidden, inter,
                                    triton.cdiv(hidden, _MIN_BN), 1, grid=(1,))
        return {"kernels": compiled_kernels()}

    def tune(self, counts: list[int], room_bytes: int, chunk: int) -> dict:
        """On scratch experts on the first device (weights of a trained model's scale), on a side stream of its
        own, what ``tuning_plan`` says for calls on batches of ``counts`` rows cut into chunks of ``chunk``: the
        first call's check against the bmm path and its race with it (``fastest``: the choice is kept per shape,
        dtype and device, so the real experts' calls take it), then autotuning at every other bucket."""
        first, rows = tuning_plan(self.shape, self.dtype, counts, self.reference_bytes_per_row, chunk, room_bytes)
        if not first and not rows:
            return {"buckets": [], "skipped": "no room for scratch experts" if counts else "no batch lengths"}
        num, two_i, hidden = self.shape
        device = self.devices[0]
        scale = hidden ** -0.5
        experts = SimpleNamespace(act_fn=torch.nn.functional.silu)
        saved, x = (dict(_state), dict(_choice)), None
        try:
            with _side_stream(device):
                experts.gate_up_proj = torch.randn(self.shape, dtype=self.dtype, device=device).mul_(scale)
                experts.down_proj = torch.randn(num, hidden, two_i // 2, dtype=self.dtype, device=device).mul_(scale)
                x = torch.randn(max([first, *rows]), hidden, dtype=self.dtype, device=device)
                if first:
                    fastest(experts, x[:first], self.reference, self.reference_bytes_per_row)
                for n in rows:
                    all_expert_norms(experts, x[:n])
                path = _choice.get((self.shape, self.dtype, str(x.device)))
        except torch.OutOfMemoryError:  # scratch's fault, not the kernels': the first batch checks and tunes them
            _state.update(saved[0])
            _choice.clear()
            _choice.update(saved[1])
            raise
        finally:
            experts = x = None
            if device.type == "cuda":
                torch.cuda.empty_cache()  # blocks freed on that stream would serve no other: back to the driver
        return {"buckets": sorted({bucket_of(n) for n in [first, *rows] if n}), "path": path}


@contextmanager
def _side_stream(device: torch.device):
    """On a GPU: a stream of its own on ``device``, synchronized at the end (nothing to do on the CPU)."""
    with _on(device), torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else nullcontext():
        yield
        if device.type == "cuda":
            torch.cuda.current_stream().synchronize()


def compiled_kernels() -> int:
    """Compiled variants of both kernels in this process, all devices (bench_scoring_phase.py reports it after a run,
    to compare with the count after ``KernelWarmUp.compile``: none compiled in the loop)."""
    return sum(len(caches[0]) for kernel in (_gate_up_act, _down_sq) for caches in kernel.fn.device_caches.values())


def _seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def bytes_per_row(experts, dtype: torch.dtype) -> int:
    """Working memory of ``all_expert_norms`` per row of x: act [E, T, I] and the float32 partial sums."""
    return _row_bytes(tuple(experts.gate_up_proj.shape), dtype)


def _row_bytes(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    num, two_i, hidden = shape
    return num * (two_i // 2 * (torch.finfo(dtype).bits // 8) + -(-hidden // _MIN_BN) * 4)


def timed_rows(experts, rows: int, dtype: torch.dtype, reference_bytes_per_row: int) -> int:
    """Rows to time both paths on, for a call on ``rows`` rows: as many as keep the reference's working
    memory within the fused kernels' on all rows, so deciding costs no more peak memory than scoring."""
    return _probe_rows(tuple(experts.gate_up_proj.shape), rows, dtype, reference_bytes_per_row)


def _probe_rows(shape: tuple[int, int, int], rows: int, dtype: torch.dtype, reference_bytes_per_row: int) -> int:
    return rows * _row_bytes(shape, dtype) // max(reference_bytes_per_row, 1)


def fastest(experts, x: torch.Tensor, reference, reference_bytes_per_row: int) -> torch.Tensor:
    """Norms through the fused kernels or ``reference`` (the bmm path), whichever is faster for this
    expert shape; decided once per shape by timing both on the first call that allows at least 1024
    rows (``timed_rows``; ``reference_bytes_per_row``: the reference's working memory per row).  On the
    device that holds x: Triton launches on the current one."""
    with _on(x.device):
        return _fastest(experts, x, reference, reference_bytes_per_row)


def _on(device: torch.device):
    """``device`` made the current GPU (nothing to do on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _fastest(experts, x: torch.Tensor, reference, reference_bytes_per_row: int) -> torch.Tensor:
    forced = os.environ.get("REAP_FULL_KERNEL", "auto")
    key = (tuple(experts.gate_up_proj.shape), x.dtype, str(x.device))
    choice = "triton" if forced == "triton" else _choice.get(key)
    if choice == "bmm":
        return reference(experts, x)
    out = checked_norms(experts, x, reference)
    if out is None:
        return reference(experts, x)
    rows = timed_rows(experts, x.shape[0], x.dtype, reference_bytes_per_row)
    if choice is None and rows >= _MIN_TIMED_ROWS:
        probe = x[:rows]
        try:
            reference(experts, probe)  # warm: cuBLAS picks its kernels for this shape
            all_expert_norms(experts, probe)
            runs = [(_seconds(lambda: all_expert_norms(experts, probe)), _seconds(lambda: reference(experts, probe)))
                    for _ in range(_RACE_RUNS)]  # alternated, the best of each: other work on the GPU (a model
            fused, bmm = (min(times) for times in zip(*runs))  # loading, another process) weighs on both alike
        except Exception as exc:  # e.g. out of memory for the second path: keep the one that ran
            log.warning("could not time the all-experts paths (%s); keeping the fused kernels", exc)
            fused, bmm = 0.0, 1.0
        _choice[key] = "triton" if fused <= bmm else "bmm"
        log.info("all-experts norms for experts %s: fused kernels %.1f ms, bmm %.1f ms on %d rows: %s",
                 key[0], fused * 1e3, bmm * 1e3, rows, _choice[key])
    return out
