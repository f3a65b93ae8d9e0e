"""Data-parallel scoring under torchrun: each rank scores a disjoint share of the batches (round-robin, or
balanced by each batch's estimated cost: ``DistContext.my_batches``).

PyTorch's own launcher and collectives do the work (``torchrun --nproc-per-node N reap.py``; multi-node
with torchrun's rendezvous flags).  Each rank keeps its own float64 sums (and its own resume file); at
the end the sums are all-reduced, so the result equals a single-process run up to float64 summation
order, and rank 0 alone writes the outputs.

No collective ever waits for a rank that is still scoring: NCCL's watchdog aborts the job once a collective has
waited 10 minutes (gloo's collectives time out too), and a rank whose share was scored before (resumed) may wait
for hours.  So the ranks first meet in the process group's key-value store, with no timeout (``arrive``), and only
then reduce (all layers in one SUM and one MAX collective).  NCCL forms its communicator at a group's first
collective (most of the 0.45 s the reduce took on 2 H200s), so ``start`` issues one tiny collective on a side
thread while the model loads; every rank issues it at the same point, before anything can diverge, so it waits
only for the ranks' start.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..calibration.encode import num_batches
from ..errors import ReapError
from .stats import MAXIMA, ExpertStats

log = logging.getLogger(__name__)

_ARRIVALS = itertools.count()  # the n-th meeting of a process has the same key on every rank
_TIMINGS = itertools.count()  # the same for the ranks' timings handed over at a reduce
_AGREED = itertools.count()  # the same for the values compared by ``agree``
_FAILED = "failed"  # store key (``_key``): the rank that failed, for the ranks waiting in ``arrive``
_POLL_MAX_S = 0.05  # the longest pause between two looks at the store: the delay the last rank's arrival may see
_STOP_JOIN_S = 5.0  # how long a failing rank waits for the first collective before leaving without tearing down


@dataclass
class _Link:
    """The thread issuing the first collective, and what it took."""

    thread: threading.Thread | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _link: _Link = field(default_factory=_Link, init=False, repr=False, compare=False)

    @classmethod
    def from_env(cls) -> DistContext:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """Each rank's own GPU under torchrun: cuda and cuda:N both become cuda:LOCAL_RANK, since a fixed
        cuda:N would put every rank on one GPU."""
        if self.enabled and device.startswith("cuda"):
            if device != "cuda":
                warnings.warn(f"--device {device} is replaced by cuda:{self.local_rank} under torchrun "
                              "(one GPU per rank)", stacklevel=2)
            return f"cuda:{self.local_rank}"
        return device

    def start(self, device: str) -> None:
        """Join the process group; on CUDA, NCCL's communicator is formed on a side thread meanwhile (gloo connects
        every pair of ranks in ``init_process_group`` already)."""
        if self.enabled and not dist.is_initialized():
            cuda = device.startswith("cuda")
            if cuda:
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl" if cuda else "gloo")
            if cuda:
                self.connect(device)
        if self.enabled and not self.is_main:
            os.environ["TQDM_DISABLE"] = "1"  # one progress bar, rank 0's

    def connect(self, device: str) -> None:
        """Issue the group's first collective (a 1-element all-reduce on ``device``) on a daemon thread, for the
        communicator it forms.  Every rank must call it at the same point, before any other collective; ``settle``
        joins it.  A failure is logged, and the reduce refuses to run: the other ranks' collectives may have been
        issued, and one of them would be matched with this rank's reduce."""
        link = self._link

        def first() -> None:
            t0 = time.perf_counter()
            try:
                _first_collective(device, self.world_size)
            except Exception as exc:  # said at once; the reduce raises it (``all_reduce``)
                link.error = f"{type(exc).__name__}: {exc}"
                log.warning("NCCL's first collective failed on rank %d: %s", self.rank, link.error)
            link.seconds = round(time.perf_counter() - t0, 3)

        link.thread = threading.Thread(target=first, name="reap-dist-connect", daemon=True)
        link.thread.start()

    @property
    def first_collective(self) -> dict:
        """What the first collective's thread took (None where none ran or it runs still) and its error, if any."""
        return {"seconds": self._link.seconds, "error": self._link.error}

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for the first collective's thread (collectives from two threads must reach every rank in one
        order, so none is issued before it ends); False if it is still running after ``timeout`` seconds."""
        thread = self._link.thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
            self._link.thread = None
        return True

    def stop(self, ok: bool = True) -> None:
        """Leave the process group.  After a success every rank first waits for the others (rank 0 is
        still writing), since tearing gloo down under a peer aborts the process; after a failure it
        does not wait, so a failing rank cannot hang the rest (torchrun ends them), but says so to the ranks
        waiting in ``arrive``.  A group whose first collective is still running is left to the process's exit:
        tearing it down under that collective is not safe."""
        if not (self.enabled and dist.is_initialized()):
            return
        if ok:
            self.settle()
            dist.barrier()
        else:
            _announce_failure(self.rank)
            if not self.settle(_STOP_JOIN_S):
                return
        dist.destroy_process_group()

    def arrive(self, what: str) -> None:
        """Wait until every rank has arrived here, through the group's key-value store and with no timeout: a rank
        may score for hours after another is done, and a collective issued meanwhile would wait under the
        group's timeout.  Every rank makes the same calls in the same order.  A rank killed meanwhile is
        torchrun's to end us; one that failed (``stop(ok=False)``) makes this raise."""
        store = dist.distributed_c10d._get_default_store()  # torch has no public way to the default group's store
        key = _key(f"arrived/{what}/{next(_ARRIVALS)}")
        store.add(key, 1)
        pause = 0.001
        while store.add(key, 0) < self.world_size:  # add(key, 0) reads the count without blocking
            if store.check([_key(_FAILED)]):
                raise ReapError(f"rank {store.get(_key(_FAILED)).decode()} of {self.world_size} failed (its own error "
                                "says why); this rank stops too")
            time.sleep(pause)
            pause = min(2 * pause, _POLL_MAX_S)

    def agree(self, what: str, value: str) -> list[str]:
        """Every rank's ``value`` of ``what``, in rank order (alone: this one's), handed over through the store once
        every rank has come here (``arrive``): for checks that the ranks computed the same thing."""
        if not self.enabled:
            return [value]
        store = dist.distributed_c10d._get_default_store()
        key = _key(f"agreed/{what}/{next(_AGREED)}")
        store.set(f"{key}/{self.rank}", value)
        self.arrive(f"agreed/{what}")  # every rank's value is set before it arrives
        return [store.get(f"{key}/{rank}").decode() for rank in range(self.world_size)]

    def my_batches(self, num_batches: int, costs: list[float] | None = None) -> list[int]:
        """Batch indices this rank scores, in increasing order.  Without ``costs``, round-robin (shares differ by at
        most one batch); with ``costs`` (one estimate per batch, e.g. ``BatchOrder.batch_costs``; the same on every
        rank), ``balanced_shares``."""
        if not costs:
            return list(range(self.rank, num_batches, self.world_size))
        if len(costs) != num_batches:
            raise ValueError(f"{len(costs)} batch costs for {num_batches} batches")
        return balanced_shares(costs, self.world_size)[self.rank]

    def my_samples(self, samples: list, batch_size: int, costs: list[float] | None = None) -> list:
        """This rank's samples (``samples_of`` its ``my_batches``)."""
        return samples_of(samples, batch_size, self.my_batches(num_batches(samples, batch_size), costs))

    def all_reduce(self, stats: ExpertStats, timing: dict | None = None) -> list[dict]:
        """Sum every rank's float64 sums and token counts into every rank's ``stats``; the maxima (``MAXIMA``)
        are reduced with max.  The ranks first meet (``arrive``), so no collective waits for a rank still
        scoring.  ``timing``: this rank's figures (JSON-able), returned with every other rank's, in rank order
        (alone: nothing), so rank 0 can say how long each rank scored and how long the others waited for it."""
        if not self.enabled:
            return []
        self.settle()
        if self._link.error:
            raise ReapError(f"rank {self.rank}: NCCL's first collective failed ({self._link.error}), so the ranks "
                            "cannot reduce safely; check the GPUs and NCCL (NCCL_DEBUG=INFO says more), then rerun: "
                            "the scored batches resume")
        store = dist.distributed_c10d._get_default_store()
        key = _key(f"timing/{next(_TIMINGS)}")
        if timing is not None:
            store.set(f"{key}/{self.rank}", json.dumps(timing))
        self.arrive("reduce")  # every rank's timing is set before it arrives
        reduce_stats(stats)
        if timing is None:
            return []
        return [json.loads(store.get(f"{key}/{rank}")) for rank in range(self.world_size)]


def samples_of(samples: list, batch_size: int, batches: list[int]) -> list:
    """The samples of ``batches`` (indices, increasing), grouped so that their batches of ``batch_size`` are exactly
    the single-process batches (the last, short batch, if any, is the last of its owner's)."""
    return [s for b in batches for s in samples[b * batch_size:(b + 1) * batch_size]]


def balanced_shares(costs: list[float], world_size: int) -> list[list[int]]:
    """Each rank's batches, in increasing order.  Costliest first: the batches by decreasing cost (ties by index),
    each to the rank with the least cost so far (ties to the lowest rank).  Each batch's forward timed on an H200
    (bench/bench_batch_costs.py, run 51: bench_end_to_end.py's sets, shares by reap.py's estimate), the slowest of 2 /
    4 / 8 ranks held 1.002 / 1.010 / 1.025x the mean rank's seconds on the text-heavy set and 1.011 / 1.018 /
    1.113x on the image-heavy one (24 batches); giving the batches out in batch order instead, 1.002 / 1.018 /
    1.039x and 1.020 / 1.030 / 1.113x.  Round-robin gave rank 0 the longest of every N (sorted batches come longest
    first): 1.038x the mean rank's padded positions on 2 ranks, 1.216x on 8."""
    load = [0] * world_size  # whole-number costs add exactly
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for batch in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += costs[batch]
        owned[rank].append(batch)
    return [sorted(batches) for batches in owned]


def reduce_stats(stats: ExpertStats) -> None:
    """All-reduce every layer at once: one SUM collective over all the layers' sums and token counts, one MAX over
    their maxima, one read of the counts back to the host.  Each element is reduced by the same operation as
    layer by layer, so on 2 ranks (a + b either way) the result is bitwise the same."""
    layers = [stats.layers[layer] for layer in sorted(stats.layers)]
    if not layers:
        return
    names = [sorted(n for n in layer.sums if n not in MAXIMA) for layer in layers]
    summed = [layer.sums[n] for layer, layer_names in zip(layers, names) for n in layer_names]
    counts = torch.tensor([c for layer in layers for c in (layer.n_tokens, layer.n_image_tokens)],
                          dtype=torch.float64, device=summed[0].device)
    flat = torch.cat([*summed, counts])
    peaks = torch.cat([layer.sums[n] for layer in layers for n in MAXIMA])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    totals = [int(v) for v in flat[-counts.numel():].tolist()]  # the one device-to-host read
    sums = iter(flat.split([t.numel() for t in summed] + [counts.numel()]))
    maxima = iter(peaks.split([layer.sums[n].numel() for layer in layers for n in MAXIMA]))
    for i, (layer, layer_names) in enumerate(zip(layers, names)):  # views of the reduced buffers, which are new
        for name in layer_names:  # and never overlap: a clone each was 1,100 launches (~10 ms) at 94 layers
            layer.sums[name] = next(sums)
        for name in MAXIMA:
            layer.sums[name] = next(maxima)
        layer.n_tokens, layer.n_image_tokens = totals[2 * i], totals[2 * i + 1]


def _first_collective(device: str, world_size: int) -> None:
    """A 1-element all-reduce on ``device``, checked; on CUDA on a stream of its own, so it does not queue behind
    the model's load on the default stream, and with this thread's CUDA device set (it is per thread)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    with torch.cuda.stream(torch.cuda.Stream(device)) if cuda else nullcontext():
        one = torch.ones(1, device=device)
        dist.all_reduce(one)
        total = one.item()  # waits for this stream only
    if total != world_size:
        raise RuntimeError(f"the first all-reduce gave {total}, not {world_size}")


def _key(name: str) -> str:
    """A store key of this run's attempt: torchrun's store outlives a restart (``--max-restarts``), so a key of
    an earlier attempt (its arrivals, its failure) would let ranks through early or fail them at once."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"reap_vlm/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def _announce_failure(rank: int) -> None:
    """Tell the ranks waiting in ``arrive`` that this one failed (best effort: the store may be gone)."""
    try:
        # the first failure only: a rank that stops because it heard of another's must not take the blame
        dist.distributed_c10d._get_default_store().compare_set(_key(_FAILED), "", str(rank))
    except Exception as exc:  # the rank fails anyway; its own error is the one to show
        log.debug("could not announce the failure: %s", exc)
