"""Work a fresh process's first batch would otherwise do, done on a side thread while reap.py reads its inputs and
loads the model: CUDA's libraries started, the full mode's fused kernels compiled and autotuned
(``ModelFamily.full_scoring_warm_up``); and, once the model is loaded, GPU memory taken into PyTorch's cache.

Measured on an H200 (bench/RESULTS_first_batch.md): a fresh process's first forward of a 30B-A3B-shaped model took
2.1 s against 0.42 s warm; the libraries started ahead and the memory reserved brought it to 0.9 s.  Best effort: a
step that fails is logged, and the first batch does its work, as without it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace

import torch
from torch import nn

from ..calibration.ahead import BatchStream
from ..checkpoint.loading import drop_quantization, free_memory_bytes, spreads
from ..checkpoint.reader import Checkpoint
from ..inference import inference
from ..settings import Settings
from .distributed import DistContext
from .engine import forward_batch, model_bytes
from .hooks import ReapObserver
from .layerwise import _buffers_to, _release, build_skeleton
from .norms import CUDA_CHUNK_CAP, tokens_per_chunk
from .stats import ExpertStats
from .triton_experts import side_stream

log = logging.getLogger(__name__)

RESERVE_CAP = 16 << 30  # bytes the first forwards may take from PyTorch's cache instead of the driver
REPLICA = "first batch on a replica"  # the step's name in run.warm_up
REPLICA_MARGIN = 4 << 30  # bytes the replica's forward may take besides its weights


class WarmUp:
    """Steps run in the order added on one daemon thread, started by the first ``add``; ``wait`` runs the last and
    joins; ``quiet`` holds them off (for a fork); ``abandon`` drops the steps not begun.  ``report``: what each step
    returned and its seconds, and how long the caller waited."""

    def __init__(self):
        self.results: dict[str, dict] = {}
        self.waited = 0.0
        self._steps: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._turn = threading.Condition()  # guards _busy and _held
        self._busy = False  # a step runs
        self._held = 0  # callers inside quiet
        self._closed = False

    def add(self, name: str, work: Callable[[], dict | None] | None) -> None:
        if work is None or self._closed:
            return
        self._steps.put((name, work))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reap-warm-up", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (step := self._steps.get()) is not None:
            with self._turn:
                while self._held:
                    self._turn.wait()
                self._busy = True
            try:
                self._step(*step)
            finally:
                with self._turn:
                    self._busy = False
                    self._turn.notify_all()

    def _step(self, name: str, work: Callable[[], dict | None]) -> None:
        t0 = time.perf_counter()
        try:
            result = dict(work() or {})
        except Exception as exc:  # a compiler, driver or memory problem: the first batch does the work instead
            log.warning("warm-up step %r failed (%s); the first batch does its work", name, exc)
            result = {"error": str(exc)}
        self.results[name] = {**result, "seconds": round(time.perf_counter() - t0, 3)}

    @contextmanager
    def quiet(self):
        """No step runs within: the one running ends first, the next waits (a process forked here inherits no lock
        a step holds, an import's or a library loader's).  Not for a step's own use."""
        with self._turn:
            self._held += 1
            while self._busy:
                self._turn.wait()
        try:
            yield
        finally:
            with self._turn:
                self._held -= 1
                self._turn.notify_all()

    def wait(self) -> None:
        """Every step added done (after ``abandon``: the one running)."""
        self._close()
        if self._thread is not None:
            t0 = time.perf_counter()
            self._thread.join()
            self.waited += time.perf_counter() - t0
            self._thread = None

    def abandon(self) -> None:
        """No step is added or begun from now on; the one running ends on its own."""
        while True:
            try:
                self._steps.get_nowait()
            except queue.Empty:
                break
        self._closed = True
        if self._thread is not None:
            self._steps.put(None)

    def _close(self) -> None:
        if not self._closed and self._thread is not None:
            self._steps.put(None)
        self._closed = True

    def report(self) -> dict:
        return {**self.results, "waited_s": round(self.waited, 3)} if self.results else {}

    def __enter__(self) -> WarmUp:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # the step running (all of them, unless abandoned) ends before the process may
            self.wait()
        else:  # an error: said at once
            self.abandon()


def start_cuda_libraries(device: str | torch.device, dtype: torch.dtype, hidden: int = 2048, heads: int = 32,
                         head_dim: int = 128) -> dict:
    """cuBLAS, cuBLASLt, cuDNN and the attention kernels started in ``dtype`` at the model's widths, on the default
    stream (their handles and workspaces are kept per stream and handed to the next thread that asks)."""
    from ..inference import inference

    x = torch.randn(256, hidden, dtype=dtype, device=device)
    w = torch.randn(hidden, hidden, dtype=dtype, device=device)
    torch.nn.functional.linear(x, w)
    torch.bmm(x.expand(2, -1, -1), w.expand(2, -1, -1))
    patches = torch.ones(8, 3, 2, 16, 16, dtype=dtype, device=device)  # a vision tower's patch embedding: cuDNN
    torch.nn.functional.conv3d(torch.ones(1, 3, 2, 16, 64, dtype=dtype, device=device), patches, stride=(2, 16, 16))
    q = torch.randn(1, heads, 128, head_dim, dtype=dtype, device=device)
    with inference():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.cuda.synchronize(device)
    return {}


def reserve_memory(device: str | torch.device) -> int:
    """Take a block of GPU memory into PyTorch's cache and give it back, so the first forwards split it instead of
    asking the driver (1 s of a fresh process's first forward, measured): a quarter of what is free, at most
    ``RESERVE_CAP``, and only with twice ``RESERVE_CAP`` free (a block the forwards split stays in the cache, so
    where memory is short it is left to the allocator).  Returns the bytes reserved."""
    free = free_memory_bytes(device)
    if free < 2 * RESERVE_CAP:
        return 0
    size = min(free // 4, RESERVE_CAP)
    block = torch.empty(size, dtype=torch.uint8, device=device)
    del block
    return size


class ScoringWarmUp:
    """reap.py's warm-up, started once the device and dtype are known: CUDA's libraries and, in full mode, the fused
    kernels compiled at once; the kernels tuned once the batches' lengths are known (``batches``, then ``tune``;
    it overlaps the model's load); everything joined, then memory reserved, once the model is loaded (``loaded``,
    in the scoring phase: the first batch would disturb the tuning's timings).  ``steps``: the ``WarmUp``."""

    def __init__(self, settings: Settings, ckpt: Checkpoint, engine: str, dtype: torch.dtype, device: str,
                 dist: DistContext):
        self.steps = WarmUp()
        self.engine, self.ckpt, self.settings, self.dtype = engine, ckpt, settings, dtype
        self.spread = not dist.enabled and engine == "model"  # load_model's spread
        self.counts: list[int] = []
        self.kernels = None
        self.devices: list[torch.device] = []  # the GPUs the model will use
        self.reserved = 0
        self.model_loaded = threading.Event()  # what the replica's forward stops at
        if not device.startswith("cuda"):
            return
        self.steps.add("cuda libraries", lambda: start_cuda_libraries(device, dtype, **model_widths(ckpt)))
        self.devices = _gpus(device, spreads(device, self.spread))
        if settings.scoring_mode == "full" and not ckpt.quantization:
            try:
                self.kernels = ckpt.family.full_scoring_warm_up(ckpt.config, dtype, self.devices)
            except Exception as exc:  # best effort, like every step
                log.warning("the fused kernels are not warmed up (%s); the first batch does it", exc)
        if self.kernels is not None:
            self.steps.add("fused kernels compiled", self.kernels.compile)

    def batches(self, token_counts: list[int]) -> None:
        """This rank's batches' estimated valid tokens, in order."""
        self.counts = token_counts

    def tune(self, done: int) -> None:
        """Tune the kernels for the batches from ``done`` on (unsorted: as if each held ``--batch-size`` samples of
        ``--max-seq-len`` tokens), with scratch experts where the whole model leaves room for them once loaded, in
        the chunks that room gives.  The whole-model engine only: the layer-wise one plans its memory from what is
        free."""
        if self.kernels is None or self.engine != "model":
            return
        counts = self.counts[done:] or [self.settings.batch_size * self.settings.max_seq_len]
        left = max(free_memory_bytes(self.devices[0]) - model_bytes(self.ckpt) // len(self.devices), 0)
        chunk = tokens_per_chunk(min(left // 2, CUDA_CHUNK_CAP), self.kernels.reference_bytes_per_row)
        self.steps.add("fused kernels tuned", partial(self.kernels.tune, counts, left // 4, chunk))

    def first_forward(self, stream: BatchStream) -> None:
        """Run ``stream``'s first batch through a replica of the model (``build_replica``) with this run's observer,
        on a side stream while the model loads: what a fresh process's first forward does once (CUDA loading each
        kernel, cuBLAS choosing algorithms for these shapes, the allocator growing) is then done by the time the
        scoring starts.  It stops where it is once the model is loaded (``loaded``): the replica's forward takes
        about a second and a half on an H200, longer than a small model's load, and the scoring is not to wait for
        it.  The whole-model engine only, where the loaded model leaves room for twice the replica's weights and
        ``REPLICA_MARGIN``."""
        if not self.devices or self.engine != "model":
            return
        replica = build_replica(self.ckpt, self.dtype)  # here: transformers' from_config sets process-wide state
        base = self.ckpt.family.multimodal_model(replica)
        left = free_memory_bytes(self.devices[0]) - model_bytes(self.ckpt) // len(self.devices)
        if left < 2 * _parameter_bytes(base) + REPLICA_MARGIN:
            self.steps.results[REPLICA] = {"skipped": "no room beside the model"}
            return
        self.steps.add(REPLICA, partial(replica_forward, replica, self.ckpt,
                                        partial(stream.first_batch, self.model_loaded), self.settings.scoring_mode,
                                        self.devices[0], self.dtype, min(left // 4, CUDA_CHUNK_CAP),
                                        self.model_loaded))

    def loaded(self) -> None:
        self.model_loaded.set()
        self.steps.wait()
        if len(self.devices) == 1 and self.devices[0].type == "cuda":  # spread: the memory is the loader's plan
            self.reserved = reserve_memory(self.devices[0])

    def abandon(self) -> None:
        """Nothing left to score: the steps not begun are dropped."""
        self.steps.abandon()

    def report(self) -> dict:
        """reap_metadata.json's ``run.warm_up`` (nothing on the CPU)."""
        report = self.steps.report()
        if self.reserved:
            report["memory_reserved_gib"] = round(self.reserved / 2**30, 1)
        return {"warm_up": report} if report else {}

    def __enter__(self) -> ScoringWarmUp:
        return self

    def __exit__(self, *exc) -> None:
        self.steps.__exit__(*exc)


def build_replica(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model with its first ``family.replica_layers`` decoder layers only and the rest whole (the
    vision tower), unquantized, on the meta device."""
    from transformers import AutoConfig

    family = ckpt.family
    config = AutoConfig.from_pretrained(str(ckpt.path))
    drop_quantization(config, family)
    text = family.text_section(config)
    layers, keep = text.num_hidden_layers, family.replica_layers(ckpt.config, getattr(text, "layer_types", None))
    for name, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == layers:  # one setting per layer (layer_types, ...)
            setattr(text, name, value[:keep])
    text.num_hidden_layers = keep
    return build_skeleton(ckpt, dtype, config)


class _Stopped(Exception):
    """The replica's forward stopped between two modules (``replica_forward``'s ``stop``)."""


def replica_forward(replica: nn.Module, ckpt: Checkpoint, first_batch: Callable[[], dict | None], mode: str,
                    device: torch.device, dtype: torch.dtype, chunk_bytes: int,
                    stop: threading.Event | None = None) -> dict:
    """The batch ``first_batch`` gives (``BatchStream.first_batch``) through ``replica`` (random weights of a trained
    model's scale, given here and taken back after) with an observer of ``mode``, as ``run_batches`` runs it; on a
    side stream of ``device``, its weights given while the batch is encoded.  Once ``stop`` is set, no further
    module of the replica starts."""
    family = ckpt.family
    base = family.multimodal_model(replica)
    started = [0]

    def check(module, args):
        if stop is not None and stop.is_set():
            raise _Stopped
        started[0] += 1

    hooks = [module.register_forward_pre_hook(check) for module in base.modules()]
    result = {"decoder_layers": family.text_section(replica.config).num_hidden_layers}
    try:
        with side_stream(device):
            _give_weights(base, device)
            batch = first_batch()
            if batch is None:
                skipped = "no first batch" if stop is None or not stop.is_set() else "the model loaded first"
                return {"skipped": skipped}
            blocks = list(family.moe_blocks(replica))
            stats = ExpertStats.empty([layer for layer, _ in blocks], ckpt.num_experts, device)
            observer = ReapObserver(family, stats, mode, chunk_budget_bytes=chunk_bytes)
            with observer.attached(blocks), inference():
                masks = forward_batch(base, replica.config, observer, batch, device, dtype)
            result.update(tokens=masks.n_valid, observed=[stats.layers[layer].n_tokens for layer, _ in blocks])
    except _Stopped:
        result["stopped"] = f"the model loaded after {started[0]} of the replica's module calls"
    finally:
        for hook in hooks:
            hook.remove()
        _release(base)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # blocks freed on that stream would serve no other: back to the driver
    return result


def _give_weights(module: nn.Module, device: torch.device) -> None:
    """Random weights for ``module``'s meta parameters, its buffers moved to ``device``.  The weights are views of
    one allocation: one per parameter took 0.65 s on an H200 while a model loaded."""
    meta = [(sub, name, p) for sub in module.modules() for name, p in sub._parameters.items()
            if p is not None and p.device.type == "meta"]
    sizes = [-(-p.numel() * p.element_size() // _ALIGN) * _ALIGN for _, _, p in meta]
    flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    offset = 0
    for (sub, name, p), size in zip(meta, sizes):
        weight = flat[offset:offset + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
        weight.normal_(0.0, 0.02) if weight.is_floating_point() else weight.zero_()
        sub._parameters[name] = nn.Parameter(weight, requires_grad=False)
        offset += size
    _buffers_to(module, device)


_ALIGN = 256  # bytes: each weight's start in the one allocation, as the allocator aligns its blocks


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _gpus(device: str, spread: bool) -> list[torch.device]:
    """The GPUs a model loaded on ``device`` uses: every visible one when spread over them, else the one, indexed."""
    if spread:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    index = torch.device(device).index
    return [torch.device("cuda", torch.cuda.current_device() if index is None else index)]


def model_widths(ckpt: Checkpoint) -> dict[str, int]:
    """The decoder's hidden size, attention heads and head size (``start_cuda_libraries``' shapes)."""
    dims = ckpt.family.decoder_dims(SimpleNamespace(**ckpt.family.text_section(ckpt.config)))
    return {"hidden": dims["hidden"], "heads": dims["heads"], "head_dim": dims["head_dim"]}
