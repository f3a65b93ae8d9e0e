"""Data-parallel scoring under torchrun: each rank scores a disjoint share of the batches.

PyTorch's own launcher and collectives do the work (``torchrun --nproc-per-node N reap.py``; multi-node
with torchrun's rendezvous flags).  Each rank keeps its own float64 sums (and its own resume file); at
the end the sums are all-reduced, so the result equals a single-process run up to float64 summation
order, and rank 0 alone writes the outputs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..calibration.encode import num_batches
from .stats import MAXIMA, ExpertStats


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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
        if self.enabled and not dist.is_initialized():
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if self.enabled and not self.is_main:
            os.environ["TQDM_DISABLE"] = "1"  # one progress bar, rank 0's

    def stop(self, ok: bool = True) -> None:
        """Leave the process group.  After a success every rank first waits for the others (rank 0 is
        still writing), since tearing gloo down under a peer aborts the process; after a failure it
        does not wait, so a failing rank cannot hang the rest (torchrun ends them)."""
        if self.enabled and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()

    def my_batches(self, num_batches: int) -> list[int]:
        """Batch indices this rank scores: round-robin, so shares differ by at most one batch."""
        return list(range(self.rank, num_batches, self.world_size))

    def my_samples(self, samples: list, batch_size: int) -> list:
        """This rank's samples, grouped so that its batches are exactly the single-process batches it owns."""
        return [s for b in self.my_batches(num_batches(samples, batch_size))
                for s in samples[b * batch_size:(b + 1) * batch_size]]

    def all_reduce(self, stats: ExpertStats) -> None:
        """Sum every rank's float64 sums and token counts into every rank's ``stats``; the maxima (``MAXIMA``)
        are reduced with max."""
        if not self.enabled:
            return
        for layer in sorted(stats.layers):
            layer_stats = stats.layers[layer]
            names = sorted(n for n in layer_stats.sums if n not in MAXIMA)
            flat = torch.cat([layer_stats.sums[n] for n in names] + [
                torch.tensor([layer_stats.n_tokens, layer_stats.n_image_tokens], dtype=torch.float64,
                             device=layer_stats.sums[names[0]].device)])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            size = layer_stats.num_experts
            for i, name in enumerate(names):
                layer_stats.sums[name] = flat[i * size:(i + 1) * size].clone()
            layer_stats.n_tokens, layer_stats.n_image_tokens = (int(v) for v in flat[-2:].tolist())
            peaks = torch.cat([layer_stats.sums[n] for n in MAXIMA])
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
            for i, name in enumerate(MAXIMA):
                layer_stats.sums[name] = peaks[i * size:(i + 1) * size].clone()

