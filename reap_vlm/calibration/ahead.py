"""Encoding ahead: calibration batches prepared by background workers while the model runs the previous ones.

Two kinds of worker, one way of handing batches out (``BatchStream``: a queue of futures, batch i always the i-th
batch of ``batch_chunks(samples)``, so the sums, resume and the torchrun shares are those of inline encoding,
bitwise):

* threads: no start-up, no hand-over.  Pillow's decode/resize, the processor's torch ops and the Rust tokenizer
  release the GIL, so threads scale; their Python between those holds it.  That costs the main thread, which
  launches thousands of small kernels per batch and takes the GIL back after each: a plain forward over a text
  set's batches ran 1.20x slower on an H200 beside 8 encoding threads, 1.03x beside 8 processes (a shorter
  thread switch interval did not help: 1.18x).
* processes: forked on Linux (0.07 s to start on a 2-core box; spawned ones took ~12 s on the GPU box to import
  torch and transformers), each runs its torch ops on one thread and sends each batch back through /dev/shm.  The
  hand-over costs this process in turn, by the batch's size.

Either way, with ``pin``, one thread of this process (``reap-pin``) joins and pins the next ``PIN_AHEAD`` batches only,
not every batch in flight.

``--encode-workers-kind auto`` follows the measurements end to end (reap.py routed, bench/RESULTS_scoring.md, issue
18): on a text-heavy set processes won (11.90 s against 12.89 s; in the isolated loop a forward beside processes ran
1.03x, beside threads 1.20x); on 1-4 MP photos processes won each of three end-to-end comparisons on an H200 (by 2%,
2% and 10%), although each batch's ~150 MB of pixels goes through /dev/shm.  So: processes where they fork and
/dev/shm has room, else threads.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import torch

from ..errors import ReapError
from ..families import ModelFamily, family_for_processor
from ..settings import ENCODE_WORKER_KINDS
from .encode import EncodedSample, batch_chunks, collate, encode_sample, pad_token_id
from .files import CalibrationSample

AHEAD_PER_WORKER = 2  # batches in flight per worker: each worker has the next one queued when it finishes
# Batches held in page-locked memory ahead of the forward.  Few: each new page-locked buffer is a cudaHostAlloc,
# which holds CUDA's driver lock while it maps the pages, and the forward's launches wait on that lock.  Pinning
# every batch in flight (16 x ~150 MB of pixels) made 89 allocations in the loop, 5.5 s, and the first batch of an
# H200 run took 5.6 s instead of 0.43 (bench/bench_scoring_phase.py).  Two ahead reuse a handful of buffers.
PIN_AHEAD = 2
SHM = "/dev/shm"


def default_workers(processes_on_host: int = 1) -> int:
    """Encoding workers for ``--encode-workers auto``: this process's share of the host's cores less its main
    thread, at most 8 (the forward's own host work needs a core)."""
    # the cores this process may run on (taskset, a container's cpuset), not the host's
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    share = usable // max(1, processes_on_host)
    return max(1, min(8, share - 1))


def worker_kind(requested: str, shm_short: bool = False) -> str:
    """``--encode-workers-kind`` (checked by the settings).  auto: processes (their Python does not hold the GIL that
    the loop launching the forward's kernels needs) where they fork and /dev/shm has room (``shm_short`` else),
    else threads.  Measured: see the module's docstring."""
    if requested != "auto":
        return requested
    return "processes" if start_method() == "fork" and not shm_short else "threads"


def start_method() -> str:
    """``fork`` on Linux: a forked worker has torch, transformers and the processor already.  Safe although this
    process may have threads by then (CUDA's, NCCL's under torchrun, reap.py's warm-up thread, held between two of
    its steps while reap.py forks, ``WarmUp.quiet``; never a loader or encoding thread of ours, started later):
    the child only runs Python, Pillow, the tokenizer and CPU torch on one thread, never CUDA, NCCL or a lock those
    threads hold, as DataLoader workers do.  Elsewhere ``spawn`` (macOS's system libraries are not safe to fork)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


@dataclass
class _Encoded:
    batch: dict[str, torch.Tensor] | None  # None: the samples apart, to be collated by the stream
    seconds: float
    warnings: list = field(default_factory=list)  # (message, category) from a worker process, raised here in order
    samples: list[EncodedSample] = field(default_factory=list)


def _encode_timed(processor, chunk: list, encode_args: tuple, pixel_dtype: torch.dtype | None,
                  model_config: dict | None, apart: bool = False) -> _Encoded:
    """``chunk``'s padded batch, or (``apart``) its samples for the stream to collate: the same tensors."""
    t0 = time.perf_counter()
    samples = [encode_sample(processor, s, *encode_args) for s in chunk]
    if pixel_dtype is not None:
        # the model's first step on pixels is this same cast (to its vision tower's dtype): done here, the
        # batch crosses shared memory and the pinned copy at half the bytes, to the same values
        samples = [_cast_pixels(e, pixel_dtype) for e in samples]
    if apart:
        return _Encoded(None, time.perf_counter() - t0, samples=samples)
    return _Encoded(model_batch(samples, processor, encode_args[2], model_config), time.perf_counter() - t0)


def model_batch(samples: list[EncodedSample], processor, family: ModelFamily | None,
                model_config: dict | None) -> dict[str, torch.Tensor]:
    """The padded batch of ``samples`` and, given the model's ``model_config``, the inputs its forward would
    otherwise derive on the device (``ModelFamily.model_inputs``)."""
    batch = collate(samples, pad_token_id(processor))
    if model_config is not None:
        batch.update((family or family_for_processor(processor)).model_inputs(batch, model_config))
    return batch


def _cast_pixels(sample: EncodedSample, dtype: torch.dtype) -> EncodedSample:
    pixels = sample.pixel_values
    if pixels is None or not pixels.is_floating_point():
        return sample
    return dataclasses.replace(sample, pixel_values=pixels.to(dtype))


PIN_ALIGN = 64  # bytes: each tensor's offset in a batch's page-locked buffer, a multiple of any element size
# Page-locked buffers reserved before the first batch (see BatchStream's ``pin_floor``): those pinned ahead, the one
# in use and one whose copy may still run.
PIN_BUFFERS = PIN_AHEAD + 2
PIN_FLOOR_MAX = 512 << 20  # bytes: above this, buffers of each batch's own size (the reserve would take too much)


def _pinned(batch: dict[str, torch.Tensor], floor: int = 0) -> dict[str, torch.Tensor]:
    """The batch's tensors as views of one page-locked buffer of at least ``floor`` bytes.  One allocation per
    batch, not one per tensor, and of one size for every batch: each new one is a cudaHostAlloc holding CUDA's
    driver lock (see PIN_AHEAD), which PyTorch's cache saves only for a size it holds (by powers of two) once a
    buffer's copies are done.  A batch with the model's inputs (``model_batch``) holds ten tensors."""
    return packed(batch, pin_memory=True, floor=floor)


def _reserve_pinned(nbytes: int, count: int) -> None:
    """``count`` page-locked buffers of ``nbytes`` into PyTorch's cache, for the batches to reuse (an error here,
    on the pinning thread, is never read: the batches then allocate their own)."""
    buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    del buffers


def pin_floor(processor, family: ModelFamily | None, batch_size: int, max_seq_len: int,
              pixel_dtype: torch.dtype | None) -> int:
    """The size of every batch's page-locked buffer: the largest a batch can take (``batch_bytes_bound``, with a
    1/16 margin for the model's inputs and the alignment), or 0 (each batch its own size) above PIN_FLOOR_MAX."""
    bound = batch_bytes_bound(processor, family, batch_size, max_seq_len, pixel_dtype)
    bound += bound // 16 + PIN_ALIGN * 16
    return bound if bound <= PIN_FLOOR_MAX else 0


def packed(batch: dict[str, torch.Tensor], pin_memory: bool, floor: int = 0) -> dict[str, torch.Tensor]:
    """``batch``'s tensors copied into one buffer (of at least ``floor`` bytes), each a view of it at an offset
    aligned to ``PIN_ALIGN``."""
    sizes = [-(-t.nbytes // PIN_ALIGN) * PIN_ALIGN for t in batch.values()]
    buffer = torch.empty(max(sum(sizes), floor), dtype=torch.uint8, pin_memory=pin_memory)
    pinned, offset = {}, 0
    for (key, tensor), size in zip(batch.items(), sizes):
        view = buffer[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        pinned[key] = view
        offset += size
    return pinned


def _result(future: Future) -> _Encoded:
    """An encoding worker's batch (a process's, out of shared memory), or its error."""
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise _died(exc) from None


def _died(exc: BrokenProcessPool) -> ReapError:
    return ReapError(f"an encoding process died ({exc}); if the host ran out of memory, lower --encode-workers or "
                     "use --encode-workers-kind threads")


# ----------------------------------------------------------------------------------------------- worker processes

_PROCESS: dict = {}  # a worker process's processor and encoding arguments, set once by _process_start


def _process_start(processor, encode_args: tuple, pixel_dtype: torch.dtype | None,
                   model_config: dict | None) -> None:
    """``processor``: the object itself (forked) or its pickle (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it closes the pool
    torch.set_num_threads(1)  # see _one_op_thread
    # one thread each: the workers are the parallelism (and a forked Rust tokenizer would warn and fall back)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threading.Thread(target=_exit_with_parent, args=(multiprocessing.parent_process().sentinel,),
                     daemon=True).start()
    if isinstance(processor, bytes):
        processor = pickle.loads(processor)
    _PROCESS.update(processor=processor, encode_args=encode_args, pixel_dtype=pixel_dtype, model_config=model_config)


def _exit_with_parent(sentinel) -> None:
    # A parent killed (SIGKILL, SIGTERM, OOM) runs no cleanup: without this the worker would wait on its task
    # queue for ever.  The sentinel is ready once the parent is gone, however it went.
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _process_encode(chunk: list, apart: bool = False) -> _Encoded:
    """One batch (or its samples) in a worker process; its warnings travel with it (the parent raises them again
    in order)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = _encode_timed(_PROCESS["processor"], chunk, _PROCESS["encode_args"], _PROCESS["pixel_dtype"],
                                _PROCESS["model_config"], apart)
    encoded.warnings = [(str(w.message), w.category) for w in caught]
    return encoded


def batch_bytes_bound(processor, family: ModelFamily | None, batch_size: int, max_seq_len: int,
                      pixel_dtype: torch.dtype | None) -> int:
    """Most bytes one batch can take: every position an image token, its pixels (3 channels, a frame possibly
    repeated over a temporal patch of 2) in ``pixel_dtype`` (float32 when None), plus the id/mask rows."""
    family = family or family_for_processor(processor)
    positions = batch_size * max_seq_len
    per_position = 8 * 3  # input_ids, attention_mask (int64), mm_token_type_ids (int32)
    if family.has_vision:
        itemsize = (pixel_dtype or torch.float32).itemsize
        per_position += family.pixels_per_image_token(processor) * 3 * 2 * itemsize
    return positions * per_position


def shm_free_bytes() -> int | None:
    try:
        stat = os.statvfs(SHM)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def shm_problem(processor, family: ModelFamily | None, workers: int, batch_size: int, max_seq_len: int,
                pixel_dtype: torch.dtype | None) -> str | None:
    """Batches come back from encoding processes in shared memory: what is wrong when it cannot hold the batches
    in flight, else None."""
    free = shm_free_bytes()
    in_flight = AHEAD_PER_WORKER * workers
    need = in_flight * batch_bytes_bound(processor, family, batch_size, max_seq_len, pixel_dtype)
    if free is None or free >= need:
        return None
    return (f"{SHM} has {free / 2**30:.1f} GiB free, encoding processes may need {need / 2**30:.1f} GiB for "
            f"{in_flight} batches in flight")


def _one_op_thread() -> None:
    """An encoding thread runs its torch ops on itself alone.  Under OpenMP every thread that runs a parallel op
    leads a team of its own as large as the core count: 8 encoding threads would keep 8 x cores threads busy and
    starve the main thread, whose kernel launches keep the GPU fed.  The setting is the calling thread's, but it
    also becomes the default of threads started later, hence ``BatchStream.close`` restores it."""
    torch.set_num_threads(1)


def _process_ready() -> None:
    """A task that only makes the pool start its workers (a spawn context starts one per task submitted)."""


class EncodingProcesses:
    """A ``BatchStream``'s ``workers`` encoding processes (``start_method``), started at construction (reap.py:
    before the model loads, so spawned ones' start-up overlaps the load).  Each batch comes back through shared
    memory."""

    def __init__(self, processor, workers: int, batch_size: int, max_seq_len: int, max_pixels: int,
                 family: ModelFamily | None, *, pixel_dtype: torch.dtype | None = None,
                 model_config: dict | None = None):
        self.workers = workers
        self.encode_args, self.pixel_dtype = (max_seq_len, max_pixels, family), pixel_dtype
        self._check_shm(processor, batch_size)
        method = start_method()
        initargs = (processor if method == "fork" else self._processor_bytes(processor), self.encode_args,
                    pixel_dtype, model_config)
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                        initializer=_process_start, initargs=initargs)
        for _ in range(workers):
            self.pool.submit(_process_ready)  # a fork context forks every worker at the first task

    @staticmethod
    def _processor_bytes(processor) -> bytes:
        try:
            return pickle.dumps(processor)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ReapError(f"the processor cannot be sent to encoding processes ({exc}); use "
                            "--encode-workers-kind threads") from None

    def _check_shm(self, processor, batch_size: int) -> None:
        max_seq_len, _, family = self.encode_args
        problem = shm_problem(processor, family, self.workers, batch_size, max_seq_len, self.pixel_dtype)
        if problem:
            raise ReapError(f"{problem}; give the container more shared memory (docker --shm-size 16g), lower "
                            "--encode-workers, or use --encode-workers-kind threads")

    def submit(self, chunk: list, apart: bool = False) -> Future:
        try:
            return self.pool.submit(_process_encode, chunk, apart)
        except BrokenProcessPool as exc:  # a worker died since the last batch was handed in
            raise _died(exc) from None

    def close(self) -> None:
        """End the workers now, the batches in progress unwanted (waiting for them could take seconds)."""
        if self.pool is None:
            return
        processes = list((getattr(self.pool, "_processes", None) or {}).values())  # the executor's own list
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        self.pool = None


class BatchStream:
    """The padded batches of ``samples`` (from batch ``first`` on), in order, encoded by ``workers`` threads or
    processes (``kind``) up to ``AHEAD_PER_WORKER * workers`` batches ahead of the consumer (``workers`` 0:
    inline, when asked).  ``pixel_dtype``: the dtype pixel values are cast to (the model's).

    ``model_config``: the model's config.json; each batch then also holds the inputs the model's forward would
    derive from it on the device (``ModelFamily.model_inputs``), computed by the workers.
    Encoding starts at construction, so batches are ready by the time a model finishes loading.  ``pin``: the
    batches come in page-locked memory, so that ``.to("cuda", non_blocking=True)`` overlaps the forward before; one
    thread pins the next ``PIN_AHEAD`` (see there why no more), each into a buffer of the largest batch's size
    (``same_size_buffers`` False: of its own size, for a consumer that keeps every batch).
    Use as a context manager or call ``close``: a consumer that stops early (a kill, an error) leaves no thread or
    process behind."""

    def __init__(self, processor, samples: list[CalibrationSample], batch_size: int, max_seq_len: int,
                 max_pixels: int, family: ModelFamily | None, *, workers: int, pin: bool = False,
                 kind: str = "threads", pixel_dtype: torch.dtype | None = None, model_config: dict | None = None,
                 same_size_buffers: bool = True):
        if kind not in ENCODE_WORKER_KINDS[1:]:
            raise ValueError(f"kind {kind!r}: threads or processes")
        self.chunks = batch_chunks(samples, batch_size)
        self.encode_args = (max_seq_len, max_pixels, family)
        self.processor, self.pin, self.workers, self.pixel_dtype = processor, pin, workers, pixel_dtype
        self.model_config = model_config
        self.kind = kind if workers > 0 else "inline"
        self.next_index = 0  # the next batch to hand out
        self.submitted = 0
        self.pending: deque[list[Future]] = deque()  # per batch: its future, or its samples' (the first)
        self.pinning: deque[Future] = deque()  # the next batches, joined and pinned on the pinning thread
        self.local = threading.local()
        self.encode_seconds = 0.0  # encoding time summed over the workers
        self.wait_seconds = 0.0  # time the consumer waited for a batch not ready yet
        self.first_wait_seconds = 0.0  # of which for the first batch (the workers' first batch not ready yet)
        self.started = time.perf_counter()
        self.first_ready_seconds: float | None = None  # from construction until the first batch was ready
        self.op_threads = torch.get_num_threads()  # restored at close: see _one_op_thread
        self.threads = self.processes = self.pinner = None
        try:
            if self.kind == "threads":
                self.threads = ThreadPoolExecutor(workers, thread_name_prefix="reap-encode",
                                                  initializer=_one_op_thread)
            elif self.kind == "processes":
                self.processes = EncodingProcesses(processor, workers, batch_size, *self.encode_args,
                                                   pixel_dtype=pixel_dtype, model_config=model_config)
            self.pin_floor = pin_floor(processor, family, batch_size, max_seq_len, pixel_dtype) \
                if pin and same_size_buffers else 0
            if pin and self.kind != "inline":
                self.pinner = ThreadPoolExecutor(1, thread_name_prefix="reap-pin")
                if self.pin_floor:  # while the model loads: none of the loop's launches waits on these
                    self.pinner.submit(_reserve_pinned, self.pin_floor, min(PIN_BUFFERS, len(self.chunks)))
            self._fill()
        except BaseException:
            self.close()
            raise

    def _processor(self):
        # Each thread its own copy: a tokenizer whose padding or truncation settings change on its first call
        # raises "Already borrowed" when two threads call it at once.
        if getattr(self.local, "processor", None) is None:
            self.local.processor = copy.deepcopy(self.processor)
        return self.local.processor

    def _submit(self, chunk: list, apart: bool = False) -> Future:
        if self.threads is not None:
            return self.threads.submit(lambda: _encode_timed(self._processor(), chunk, self.encode_args,
                                                             self.pixel_dtype, self.model_config, apart))
        return self.processes.submit(chunk, apart)

    def _fill(self) -> None:
        """Keep ``AHEAD_PER_WORKER * workers`` batches in flight, the next ``PIN_AHEAD`` of them being pinned."""
        if self.kind == "inline":
            return
        while self.submitted < len(self.chunks) and (
                len(self.pending) + len(self.pinning) < AHEAD_PER_WORKER * self.workers):
            chunk = self.chunks[self.submitted]
            if self.submitted == 0 and self.workers > 1 and len(chunk) > 1:
                # The first batch is the one wait nothing hides (the model loads in seconds from the page cache,
                # a batch of photos takes one worker ~4 s): its samples go to all workers at once.
                parts = [self._submit([sample], apart=True) for sample in chunk]
            else:
                parts = [self._submit(chunk)]
            if self.submitted == 0:
                for part in parts:
                    part.add_done_callback(self._first_ready)
            self.pending.append(parts)
            self.submitted += 1
        while self.pinner is not None and self.pending and len(self.pinning) < PIN_AHEAD:
            self.pinning.append(self.pinner.submit(self._joined, self.pending.popleft()))

    def _first_ready(self, _future: Future) -> None:
        now = time.perf_counter() - self.started
        self.first_ready_seconds = max(now, self.first_ready_seconds or 0.0)  # the batch: its last sample

    def _joined(self, parts: list[Future]) -> _Encoded:
        """The batch of ``parts``' results, in order (an encoding error raised here, in order), pinned if asked."""
        done = [_result(part) for part in parts]
        if len(done) == 1 and done[0].batch is not None:
            encoded = done[0]
        else:
            t0 = time.perf_counter()
            batch = model_batch([e for part in done for e in part.samples], self.processor, self.encode_args[2],
                                self.model_config)
            encoded = _Encoded(batch, sum(part.seconds for part in done) + time.perf_counter() - t0,
                               [w for part in done for w in part.warnings])
        return self._pinned_if_asked(encoded)

    def _pinned_if_asked(self, encoded: _Encoded) -> _Encoded:
        if self.pin:
            encoded.batch = _pinned(encoded.batch, self.pin_floor)
        return encoded

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.next_index >= len(self.chunks):
            raise StopIteration
        t0 = time.perf_counter()
        try:
            if self.kind == "inline":
                encoded = self._pinned_if_asked(_encode_timed(self.processor, self.chunks[self.next_index],
                                                              self.encode_args, self.pixel_dtype, self.model_config))
            else:
                encoded = self.pinning.popleft().result() if self.pinner else self._joined(self.pending.popleft())
                self._fill()
        except StopIteration as exc:  # raised by an encoding step, it would end the iteration: batches lost
            raise RuntimeError(f"encoding batch {self.next_index} raised StopIteration") from exc
        waited = time.perf_counter() - t0
        self.wait_seconds += waited
        if self.next_index == 0:
            self.first_wait_seconds = waited
            if self.first_ready_seconds is None:  # inline: ready once encoded here
                self.first_ready_seconds = time.perf_counter() - self.started
        self.encode_seconds += encoded.seconds
        for message, category in encoded.warnings:
            warnings.warn(message, category, stacklevel=2)
        self.next_index += 1
        return encoded.batch

    def report(self, positions: int, tokens: int) -> dict:
        """The run summary's figures: padding share of the token positions run, encoding time (all workers) and
        the part of it the consumer waited for."""
        return {"padding_share": 1.0 - tokens / positions if positions else 0.0,
                "encode_workers": self.workers, "encode_kind": self.kind,
                "encode_seconds": round(self.encode_seconds, 3),
                "encode_wait_seconds": round(self.wait_seconds, 3),
                "encode_first_wait_seconds": round(self.first_wait_seconds, 3),
                "encode_first_ready_seconds": round(self.first_ready_seconds or 0.0, 3)}

    def close(self) -> None:
        for future in [f for parts in self.pending for f in parts] + list(self.pinning):
            future.cancel()
        self.pending.clear()
        self.pinning.clear()
        if self.processes is not None:
            self.processes.close()  # the batches they were encoding fail, which ends a pinning wait on them
        if self.threads is not None:
            self.threads.shutdown(wait=True, cancel_futures=True)  # at most one batch per worker still finishing
            torch.set_num_threads(self.op_threads)
        if self.pinner is not None:
            self.pinner.shutdown(wait=True, cancel_futures=True)
        self.threads = self.processes = self.pinner = None

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
