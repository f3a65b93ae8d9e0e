"""Work a fresh process's first batch would otherwise do, done on a side thread while reap.py reads its inputs and
loads the model: CUDA's libraries started, the full mode's fused kernels compiled and autotuned
(``ModelFamily.full_scoring_warm_up``), the forward's other kernels loaded; and, once the model is loaded, GPU
memory taken into PyTorch's cache.

Measured on an H200 (bench/RESULTS_first_batch.md, RESULTS_first_batch_profile_run47.md): a fresh process's first
forward of a 30B-A3B-shaped model took 2.1 s against 0.42 s warm; the libraries started ahead and the memory
reserved brought it to 0.9 s, the forward's kernels loaded ahead to 0.51 s.  Best effort: a step that fails is
logged, and the first batch does its work, as without it."""

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

from ..checkpoint.loading import free_memory_bytes, spreads
from ..checkpoint.reader import Checkpoint
from ..families.base import output_stats
from ..settings import Settings
from .distributed import DistContext
from .engine import model_bytes
from .norms import CUDA_CHUNK_CAP, tokens_per_chunk
from .stats import LayerStats

log = logging.getLogger(__name__)

RESERVE_CAP = 16 << 30  # bytes the first forwards may take from PyTorch's cache instead of the driver


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
                         head_dim: int = 128, **_) -> dict:
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


def load_forward_kernels(device: str | torch.device, dtype: torch.dtype, hidden: int = 2048, intermediate: int = 768,
                         experts: int = 128, top_k: int = 8, **_) -> dict:
    """Launch once, on small tensors, the kernels an MoE transformer's forward launches besides the matmuls and the
    attention: ids compared, masks filled and scattered, norms in float32, the router's softmax and top-k, gathers,
    sorts, scans and histograms, rotary cos/sin, activations, reap.py's own observer (its sums, on scratch, as
    routed and full mode add them), and last the experts' grouped matmul at their widths.  CUDA loads a kernel at its
    first launch: in a fresh process's first batch these loads held the host ~0.3 s while the GPU waited, one of
    them 163 ms (bench_first_batch.py --profile).  Each op's kernel is picked by its dtypes and layout, so these are
    the forward's own combinations; an op not matched costs its first batch as before.  Every index is in range at
    any width (a device-side assert would end the process, not the step)."""
    f, n, cuda = torch.nn.functional, 64, torch.device(device).type == "cuda"
    ids = torch.arange(n, device=device)
    mask = ids == 3
    rows = mask[:, None]
    x = torch.randn(n, hidden, dtype=dtype, device=device)
    xf = x.float()
    even = hidden // 2 * 2
    launched = [ids.int(), torch.arange(n, device=device, dtype=torch.int32), ids // 2, ids[:, None] >= ids[None, :],
                mask & mask, torch.sort(ids.flip(0)), torch.cumsum(ids.int(), 0, dtype=torch.int32),
                torch.histc(ids.int() if cuda else ids.float(), bins=experts, min=0, max=experts - 1)]
    for t in (x, xf):
        launched += [t.masked_fill(rows, 0.0), torch.where(rows, t, t), t * t, t + t, -t,
                     t[:, :even:2] * t[:, 1:even:2], torch.cat([t, t], -1), t.sum(-1)]
    norm = torch.ones(hidden, dtype=dtype, device=device)
    probs = torch.softmax(torch.randn(n, experts, device=device), -1)
    weights, chosen = torch.topk(probs, min(top_k, experts), -1)
    launched += [x.masked_scatter(rows.expand_as(x), x), xf.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt(),
                 xf / (xf.abs() + 1), xf.cos(), xf.sin(), f.silu(x), f.gelu(x, approximate="tanh"), f.gelu(x),
                 f.layer_norm(x, (hidden,), norm, norm), x[ids.flip(0)],
                 torch.gather(xf, 1, torch.arange(min(4, hidden), device=device).expand(n, -1)), output_stats(x)]
    order = torch.empty_like(ids)
    order[ids.flip(0)] = ids
    x[ids.flip(0)] = x.clone()
    norms, scratch = torch.rand(n, weights.shape[1], device=device), LayerStats(experts, device)
    for every in (None, torch.rand(n, experts, device=device)):  # routed mode's sums, then full mode's
        scratch.observe(router_logits=probs, topk_ids=chosen, topk_weights=weights, valid=ids < n - 4, image=mask,
                        routed_norms=norms if every is None else None, all_norms=every, routed_max=norms,
                        n_valid=n - 4, n_image=1)
    # transformers' grouped_mm experts (bf16 only; its strides must be 16-byte multiples), two experts' weights
    if hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16 and hidden % 8 == intermediate % 8 == 0:
        w = torch.empty(2, 2 * intermediate, hidden, dtype=dtype, device=device)
        offsets = torch.tensor([n // 2, n], dtype=torch.int32, device=device)
        launched.append(torch._grouped_mm(x, w.transpose(-1, -2), offs=offsets))
    if cuda:
        torch.cuda.current_stream(device).synchronize()  # this step's work only, not the loader's copies
    return {"ops": len(launched)}


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
    kernels compiled, then tuned at the largest batch, both at once, and at the batches' own lengths once known
    (``batches``, then ``tune``; it overlaps the model's load); everything joined, then memory reserved, once the
    model is loaded (``loaded``, in the scoring phase: the first batch would disturb the tuning's timings).
    ``steps``: the ``WarmUp``."""

    def __init__(self, settings: Settings, ckpt: Checkpoint, engine: str, dtype: torch.dtype, device: str,
                 dist: DistContext):
        self.steps = WarmUp()
        self.engine, self.ckpt, self.settings = engine, ckpt, settings
        self.spread = not dist.enabled and engine == "model"  # load_model's spread
        self.counts: list[int] = []
        self.kernels = None
        self.devices: list[torch.device] = []  # the GPUs the model will use
        self.reserved = 0
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
            if engine == "model":  # the largest batch's bucket at once, before the lengths are known: tuned after
                # them, during the load, it kept an image run's first batch waiting 1.4 s (bench_end_to_end.py)
                self.steps.add("fused kernels tuned, largest batch", partial(self._tune, [self._largest]))
        # after the fused kernels, which a full-mode first batch would wait longer for; on every GPU the model uses
        self.steps.add("forward kernels", partial(self._forward_kernels, dtype))

    def _forward_kernels(self, dtype: torch.dtype) -> dict:
        """``load_forward_kernels`` on every GPU the model will use (each loads its own)."""
        widths = model_widths(self.ckpt)
        return {"ops": sum(load_forward_kernels(gpu, dtype, **widths)["ops"] for gpu in self.devices)}

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
        counts = self.counts[done:] or [self._largest]
        self.steps.add("fused kernels tuned", partial(self._tune, counts, self._room()))

    @property
    def _largest(self) -> int:
        """Rows of the largest batch the settings allow."""
        return self.settings.batch_size * self.settings.max_seq_len

    def _room(self) -> int:
        """Bytes of the first GPU left once the model is loaded, asked before the load begins (or, for the tuning at
        the largest batch, when the warm-up thread gets to it: with the load begun meanwhile, an underestimate)."""
        return max(free_memory_bytes(self.devices[0]) - model_bytes(self.ckpt) // len(self.devices), 0)

    def _tune(self, counts: list[int], left: int | None = None) -> dict:
        """``KernelWarmUp.tune`` for batches of ``counts`` rows, in the chunks ``left`` bytes give (None: asked now,
        on the warm-up thread, so the main thread does not wait for CUDA's start); a bucket tuned by an earlier step
        costs one call (Triton's autotuning and the path's choice are kept per process)."""
        left = self._room() if left is None else left
        chunk = tokens_per_chunk(min(left // 2, CUDA_CHUNK_CAP), self.kernels.reference_bytes_per_row)
        return self.kernels.tune(counts, left // 4, chunk)

    def loaded(self) -> None:
        self.steps.wait()
        if len(self.devices) == 1:  # a model spread over GPUs: their memory is the loader's plan
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


def _gpus(device: str, spread: bool) -> list[torch.device]:
    """The GPUs a model loaded on ``device`` uses: every visible one when spread over them, else the one, indexed."""
    if spread:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    index = torch.device(device).index
    return [torch.device("cuda", torch.cuda.current_device() if index is None else index)]


def model_widths(ckpt: Checkpoint) -> dict[str, int]:
    """The decoder's hidden size, attention heads and head size, an expert's intermediate size, the experts and
    top_k (the shapes of ``start_cuda_libraries`` and ``load_forward_kernels``)."""
    dims = ckpt.family.decoder_dims(SimpleNamespace(**ckpt.family.text_section(ckpt.config)))
    return {key: dims[key] for key in ("hidden", "heads", "head_dim", "intermediate", "experts", "top_k")}
