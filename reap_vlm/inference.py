"""How every forward of ours runs: without autograd, and with PyTorch's attention kernels other than cuDNN's.

cuDNN's attention builds an execution plan for each new input shape: on an H200 (torch 2.11) the first pass over
twelve new padded lengths took 377 ms per batch against 26 ms with cuDNN left out, and the second pass 21 ms
(two decoder layers of the 30B-A3B shape, ``bench/bench_first_pass.py``). Scoring passes each padded length once
and generation grows its length every token, so every forward would pay for a plan. Flash, memory-efficient and
math attention need none; which of them runs is still PyTorch's choice."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                      *([SDPBackend.OVERRIDEABLE] if hasattr(SDPBackend, "OVERRIDEABLE") else [])]
ATTENTION = "sdpa: " + ", ".join(b.name.lower() for b in ATTENTION_BACKENDS)  # part of a scoring run's identity


@contextmanager
def inference() -> Iterator[None]:
    """No autograd and no cuDNN attention, for the forwards inside."""
    with torch.inference_mode(), sdpa_kernel(ATTENTION_BACKENDS):
        yield
