"""The layer-wise engine's reader: one decoder layer's tensors at a time, read ahead on background threads and
moved to the device."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..checkpoint.reader import Checkpoint
from ..checkpoint.tensors import memory_state_dict
from ..errors import ReapError

PREFETCH_MODES = ("host", "device")
_COPY_CHUNK_BYTES = 256 << 20


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous copy of ``t`` on ``device``.  A transposed view (the loader's layout conversion)
    goes over as it lies in memory, a slice of dim 0 at a time, and is transposed there, so the copy
    needs one extra slice of memory, not one extra tensor."""
    if device.type != "cuda":
        return t.to(device).contiguous()
    if t.is_contiguous() or t.dim() < 2:
        return t.to(device, non_blocking=True).contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    rows = max(1, _COPY_CHUNK_BYTES // max(1, t[0].numel() * t.element_size()))
    for start in range(0, t.shape[0], rows):
        out[start:start + rows].copy_(t[start:start + rows].to(device, non_blocking=True))
    return out


def pin(t: torch.Tensor) -> torch.Tensor:
    try:
        return t.pin_memory()
    except RuntimeError:  # no pinned memory to be had: pageable copies still work, more slowly
        return t


@dataclass
class LoadStats:
    layers: int = 0
    bytes: int = 0
    read_seconds: float = 0.0  # background: safetensors read (memory_state_dict)
    pin_seconds: float = 0.0  # background: pinning / copy to the device (prefetch "device")
    copy_seconds: float = 0.0  # main thread: host -> device copies on the critical path
    wait_seconds: float = 0.0  # main thread: waiting for the background read

    def report(self) -> dict:
        """The run record's ``load`` entry."""
        return {"layers": self.layers, "bytes": self.bytes, "read_seconds": round(self.read_seconds, 3),
                "pin_seconds": round(self.pin_seconds, 3), "copy_seconds": round(self.copy_seconds, 3),
                "wait_seconds": round(self.wait_seconds, 3)}


class LayerLoader:
    """Reads decoder layers' tensors (``memory_state_dict``) in the background, one layer ahead, in two
    stages on two threads: the disk read, then pinning (or the copy to the device), so the disk never
    waits for a memcpy.

    prefetch "host": into pinned host memory; ``take`` copies to the device, so the device holds one
    layer at a time (host memory: up to three layers in flight).  "device": straight onto the device
    on a side stream (two layers on the device, no copy on the critical path).  Quantized checkpoints
    are dequantized on the device: with "host" the quantized tensors wait in pinned host memory and
    ``take`` dequantizes them once the previous layer is gone; with "device" on the side stream.
    """

    def __init__(self, ckpt: Checkpoint, keys: dict[int, list[str]], device: torch.device, dtype: torch.dtype,
                 prefetch: str = "host", dequantize_in_take: bool | None = None):
        if prefetch not in PREFETCH_MODES:
            raise ReapError(f"prefetch {prefetch!r} is not one of {', '.join(PREFETCH_MODES)}")
        self.ckpt, self.keys, self.device, self.dtype = ckpt, keys, device, dtype
        cuda = device.type == "cuda"
        self.prefetch = "device" if cuda and prefetch == "device" else "host"
        # quantized tensors read ahead as stored and dequantized in take(); the default on CUDA with "host"
        # (on the CPU dequantizing ahead, on the reader thread, costs no device memory)
        self.raw = bool(ckpt.quantization) and self.prefetch == "host" and (
            cuda if dequantize_in_take is None else dequantize_in_take)
        self.stream = torch.cuda.Stream(device) if cuda and self.prefetch == "device" else None
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="reap-layer-read")
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="reap-layer-pin")
        self.futures: dict[int, Future] = {}
        self.stats = LoadStats()

    def request(self, layer: int) -> None:
        if layer in self.keys and layer not in self.futures:
            read = self.reader.submit(self._read, layer)
            self.futures[layer] = self.finisher.submit(self._finish, read)

    def _read(self, layer: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        keys = self.keys[layer]
        if self.stream is not None and self.ckpt.quantization:
            with torch.cuda.stream(self.stream):  # dequantized where it will be used
                state = memory_state_dict(self.ckpt, keys, self.dtype, str(self.device))
                state = {k: v.contiguous() for k, v in state.items()}
        elif self.raw:
            state = dict(self.ckpt.read(keys, "cpu"))
        else:
            state = memory_state_dict(self.ckpt, keys, self.dtype, "cpu")
        self.stats.read_seconds += time.perf_counter() - t0
        return state

    def _finish(self, read: Future):
        state = read.result()
        t0 = time.perf_counter()
        event = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                state = {k: v if v.is_cuda else to_device(pin(v), self.device)
                         for k, v in state.items()}
                event = torch.cuda.Event()
                event.record(self.stream)
        elif self.device.type == "cuda":
            state = {k: pin(v) for k, v in state.items()}
        else:
            state = {k: v.contiguous() for k, v in state.items()}
        self.stats.pin_seconds += time.perf_counter() - t0
        return state, event

    def take(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s tensors on the device (in-memory names and layouts, contiguous)."""
        self.request(layer)
        t0 = time.perf_counter()
        state, event = self.futures.pop(layer).result()
        t1 = time.perf_counter()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in state.values():
                t.record_stream(current)
        elif self.raw:
            raw = state  # pinned: kept until the copies from it are done
            state = memory_state_dict(self.ckpt, self.keys[layer], self.dtype, str(self.device), source=raw)
            state = {k: v.contiguous() for k, v in state.items()}
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            del raw
        elif self.device.type == "cuda":
            state = {k: to_device(v, self.device) for k, v in state.items()}
            torch.cuda.current_stream(self.device).synchronize()  # the layer's compute waits for it anyway
        self.stats.wait_seconds += t1 - t0
        self.stats.copy_seconds += time.perf_counter() - t1
        self.stats.layers += 1
        self.stats.bytes += sum(t.numel() * t.element_size() for t in state.values())
        return state

    def close(self) -> None:
        for future in self.futures.values():
            future.cancel()
        self.finisher.shutdown(wait=True)
        self.reader.shutdown(wait=True)
        self.futures.clear()
