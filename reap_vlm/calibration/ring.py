"""Reused buffers that forked encoding workers write batches into.

Handing each batch over as its own shared-memory file cost the main process a map, an unmap and a pinned copy
per batch (~150 ms per batch of 1-4 MP photos on an H200 box, with the main thread blocked meanwhile: the page
tables and the CUDA host allocator take locks its kernel launches wait on).  Here the memory is mapped once,
before the workers fork (anonymous and shared: no file in ``/dev/shm``, so a container's small default does not
matter), pinned once with ``cudaHostRegister``, and each batch is a set of views into one slot, copied to the GPU
without blocking.

The contract with the consumer: a batch's tensors are valid until the next batch is taken.  Then its slot is
given back, and reused once the work queued on the current CUDA stream by then (the copy) has finished.
"""

from __future__ import annotations

import math
import mmap
from collections import deque

import torch

ALIGN = 64  # every tensor starts on a 64-byte boundary: any dtype can view it
RING_BYTES_MAX = 4 << 30  # the most memory the ring takes (pinned on CUDA)


def ring_slots(slot_bytes: int, workers: int) -> int:
    """Slots for ``workers``: two batches each (one being encoded, one ready), the one lent out and the one
    being given back; fewer where that passes ``RING_BYTES_MAX``; 0 (no ring) below one ready batch each."""
    wanted = 2 * workers + 2
    fits = RING_BYTES_MAX // max(_aligned(slot_bytes), 1)
    return min(wanted, fits) if fits >= workers + 2 else 0


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SlotRing:
    """``slots`` buffers of ``slot_bytes`` in memory shared with processes forked after it is made."""

    def __init__(self, slots: int, slot_bytes: int):
        self.slots, self.slot_bytes = slots, _aligned(slot_bytes)
        self.memory = mmap.mmap(-1, slots * self.slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS
        self.buffer = torch.frombuffer(self.memory, dtype=torch.uint8)
        self.free = deque(range(slots))
        self.returning: deque[tuple[int, object]] = deque()  # (slot, the CUDA event its last copy precedes)
        self.pinned = False
        self.device: torch.device | None = None  # where the batches are copied to

    def pin(self, device: str | torch.device) -> bool:
        """Page-lock the ring for copies to ``device`` (in this process, after the fork); False where CUDA
        refuses: the copies then block, nothing else changes."""
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return False
        portable = 1  # cudaHostRegisterPortable: pinned for every device's context
        status = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), portable)
        self.pinned = int(status) == 0
        return self.pinned

    # ---------------------------------------------------------------------------------------- in a worker

    def write(self, slot: int, batch: dict[str, torch.Tensor]) -> list[tuple] | None:
        """Copy ``batch`` into ``slot``; its layout (key, dtype, shape, offset), or None when it does not fit."""
        layout, offset = [], 0
        for key, tensor in batch.items():
            tensor = tensor.contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if offset + nbytes > self.slot_bytes:
                return None
            start = slot * self.slot_bytes + offset
            self.buffer[start:start + nbytes].copy_(tensor.reshape(-1).view(torch.uint8))
            layout.append((key, tensor.dtype, tuple(tensor.shape), offset))
            offset = _aligned(offset + nbytes)
        return layout

    # ---------------------------------------------------------------------------------------- in the consumer

    def read(self, slot: int, layout: list[tuple]) -> dict[str, torch.Tensor]:
        """The batch in ``slot``, as views (valid until the slot is given back)."""
        base = slot * self.slot_bytes
        batch = {}
        for key, dtype, shape, offset in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            start = base + offset
            batch[key] = self.buffer[start:start + nbytes].view(dtype).view(shape)
        return batch

    def take(self, wait: bool = False) -> int | None:
        """A slot no copy reads any more; None while all are in use (``wait``: wait for the oldest given back)."""
        while self.returning and (self.returning[0][1] is None or self.returning[0][1].query()
                                  or (wait and not self.free)):
            slot, event = self.returning.popleft()
            if event is not None:
                event.synchronize()
            self.free.append(slot)
        return self.free.popleft() if self.free else None

    def give_back(self, slot: int, unused: bool = False) -> None:
        """``slot``'s batch is done with: free once the copies queued so far on the current stream have run
        (``unused``: nothing was read from it, free now)."""
        event = None
        if self.pinned and not unused:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self.returning.append((slot, event))

    def close(self) -> None:
        """Unpin, after every queued copy has run (views handed out stay readable: the mapping lives on)."""
        if self.pinned:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False
