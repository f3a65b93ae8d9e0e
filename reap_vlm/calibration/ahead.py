"""Encoding ahead: calibration batches prepared on background threads while the model runs the previous ones.

Threads, not processes.  The costly parts of encoding a sample release the GIL: JPEG decoding and resizing in
Pillow, the processor's torch resize / rescale / normalize / patchify (three quarters of a 1-4 MP photo's
encoding with Qwen3-VL's processor, by cProfile), the Rust tokenizer.  A process pool would first spend 6-7 s per
worker importing transformers and loading the processor (measured), needs the processor to pickle, and hands
every batch back through shared memory (one more copy of the pixels).  On this project's shared 2-core CI machine
(load 3-8 from other jobs) neither kind scaled reliably: 12 photos took 3.4 s on 1 thread, 3.4 s on 2 threads,
2.0 s on 2 processes in one run, while the processor's torch patchify and Pillow's resize alone ran 1.0x on 2
threads and 0.9x on 2 processes in another (no core was free).  ``bench/bench_end_to_end.py`` measures 1 thread,
N threads and N processes on the GPU host: the figure that decides.

Order is kept: batch i is always the i-th batch of ``batch_chunks(samples)``, whatever thread made it, so the
sums, resume and the torchrun shares are those of inline encoding, bitwise.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..families import ModelFamily
from .encode import batch_chunks, encode_batch
from .files import CalibrationSample

AHEAD_PER_WORKER = 2  # batches in flight per worker: each worker has the next one queued when it finishes


def default_workers(processes_on_host: int = 1) -> int:
    """Encoding threads for ``--encode-workers auto``: this process's share of the host's cores less its main
    thread, at most 8 (the forward's own host work needs a core)."""
    share = (os.cpu_count() or 2) // max(1, processes_on_host)
    return max(1, min(8, share - 1))


def _one_op_thread() -> None:
    """An encoding thread runs its torch ops on itself alone.  Under OpenMP every thread that runs a parallel op
    leads a team of its own as large as the core count: 8 encoding threads would keep 8 x cores threads busy and
    starve the main thread, whose kernel launches keep the GPU fed.  The setting is the calling thread's, but it
    also becomes the default of threads started later, hence ``BatchStream.close`` restores it."""
    torch.set_num_threads(1)


class BatchStream:
    """The padded batches of ``samples`` (from batch ``first`` on), in order, encoded by ``workers`` threads up
    to ``AHEAD_PER_WORKER * workers`` batches ahead of the consumer (``workers`` 0: inline, when asked).

    Encoding starts at construction, so batches are ready by the time a model finishes loading.  ``pin``: the
    batches come in page-locked memory, so that ``.to("cuda", non_blocking=True)`` overlaps the forward before.
    Use as a context manager or call ``close``: a consumer that stops early (a kill, an error) leaves no thread
    behind."""

    def __init__(self, processor, samples: list[CalibrationSample], batch_size: int, max_seq_len: int,
                 max_pixels: int, family: ModelFamily | None, *, workers: int, pin: bool = False):
        self.chunks = batch_chunks(samples, batch_size)
        self.encode_args = (max_seq_len, max_pixels, family)
        self.processor, self.pin, self.workers = processor, pin, workers
        self.next_index = 0  # the next batch to hand out
        self.submitted = 0
        self.pending: deque[Future] = deque()
        self.local = threading.local()
        self.lock = threading.Lock()
        self.encode_seconds = 0.0  # encoding time summed over the threads
        self.wait_seconds = 0.0  # time the consumer waited for a batch not ready yet
        self.op_threads = torch.get_num_threads()  # restored at close: see _one_op_thread
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="reap-encode",
                                       initializer=_one_op_thread) if workers > 0 else None
        self._fill()

    def _processor(self):
        # Each thread its own copy: a tokenizer whose padding or truncation settings change on its first call
        # raises "Already borrowed" when two threads call it at once.
        if getattr(self.local, "processor", None) is None:
            self.local.processor = copy.deepcopy(self.processor)
        return self.local.processor

    def _encode(self, index: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        processor = self._processor() if self.pool is not None else self.processor
        batch = encode_batch(processor, self.chunks[index], *self.encode_args)
        if self.pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        with self.lock:
            self.encode_seconds += time.perf_counter() - t0
        return batch

    def _fill(self) -> None:
        if self.pool is None:
            return
        while self.submitted < len(self.chunks) and len(self.pending) < AHEAD_PER_WORKER * self.workers:
            self.pending.append(self.pool.submit(self._encode, self.submitted))
            self.submitted += 1

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.next_index >= len(self.chunks):
            raise StopIteration
        t0 = time.perf_counter()
        if self.pool is None:
            batch = self._encode(self.next_index)
        else:
            batch = self.pending.popleft().result()  # an encoding error is raised here, in order
            self._fill()
        self.wait_seconds += time.perf_counter() - t0
        self.next_index += 1
        return batch

    def report(self, positions: int, tokens: int) -> dict:
        """The run summary's figures: padding share of the token positions run, encoding time (all threads) and
        the part of it the consumer waited for."""
        return {"padding_share": 1.0 - tokens / positions if positions else 0.0,
                "encode_workers": self.workers, "encode_seconds": round(self.encode_seconds, 3),
                "encode_wait_seconds": round(self.wait_seconds, 3)}

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending:
                future.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)  # at most one batch per worker still finishing
            self.pool = None
            torch.set_num_threads(self.op_threads)

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
