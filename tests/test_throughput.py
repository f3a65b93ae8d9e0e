"""Encoding ahead on threads or processes and length-aware batching: same batches, same order, same scores."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import reap_vlm.calibration.ahead as ahead
from reap_vlm.calibration.ahead import BatchStream
from reap_vlm.calibration.encode import (
    batches,
    encode_sample,
    num_batches,
    render_text,
    text_token_count,
    text_token_counts,
)
from reap_vlm.calibration.files import CalibrationSample, load_calibration
from reap_vlm.calibration.order import ForwardCost, length_order, padded_positions, padding_share
from reap_vlm.checkpoint.loading import load_model, load_processor
from reap_vlm.checkpoint.reader import Checkpoint
from reap_vlm.errors import ReapError
from reap_vlm.score.distributed import DistContext
from reap_vlm.score.engine import run_batches
from reap_vlm.score.hooks import ReapObserver
from reap_vlm.score.job import run_reap
from reap_vlm.score.resume import stop_after
from reap_vlm.score.stats import ExpertStats
from reap_vlm.selection import select_experts
from reap_vlm.settings import Settings


def _samples(calibration: Path) -> list[CalibrationSample]:
    """Images, prompts and plain texts of many lengths: something to sort."""
    return (load_calibration(calibration / "calibration_data.json", 100).samples
            + load_calibration(calibration / "text.json", 100).samples)


def _assert_same_batches(got: list[dict], want: list[dict], pixel_dtype: torch.dtype | None = None) -> None:
    """Bitwise the same batches, in order (pixel values cast to ``pixel_dtype`` first, as the workers cast them)."""
    assert len(got) == len(want)
    for mine, theirs in zip(got, want):
        assert mine.keys() == theirs.keys()
        for key in theirs:
            expected = theirs[key].to(pixel_dtype) if key == "pixel_values" and pixel_dtype else theirs[key]
            assert mine[key].dtype == expected.dtype and torch.equal(mine[key], expected), key


def _encode_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("reap-encode", "reap-pin"))]


def _fake_pinned(batch: dict, floor: int = 0) -> dict:
    """Pinning's stand-in where no CUDA is: the same packing into one buffer, on the pinning thread all the same."""
    return ahead.packed(batch, pin_memory=False, floor=floor)


def test_encoding_ahead_gives_the_inline_batches_in_order(tiny_model, calibration):
    processor = load_processor(tiny_model)
    samples = _samples(calibration)
    inline = list(batches(processor, samples, 3, 256))
    with BatchStream(processor, samples, 3, 256, 0, None, workers=3) as stream:
        ahead = list(stream)
    assert len(inline) == 5
    _assert_same_batches(ahead, inline)
    assert stream.report(10, 9)["padding_share"] == pytest.approx(0.1)
    assert not _encode_threads()
    # the encoding threads ran their torch ops single-threaded; threads started afterwards get the old default
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [torch.get_num_threads()]


def test_the_first_batchs_samples_are_encoded_at_once(tiny_model, calibration, monkeypatch):
    """Nothing hides the first batch's encoding (the model loads in seconds from the page cache; 8 photos take
    one worker seconds): its samples go to all workers at once, each waiting here until every one of them has
    started, which only parallel encoding passes; the batches are still the inline ones, bitwise."""
    processor = load_processor(tiny_model)
    samples = _samples(calibration)
    inline = list(batches(processor, samples, 3, 256))
    first = {id(s) for s in samples[:3]}
    together = threading.Barrier(3, timeout=10)

    def encode(processor, sample, *args):
        if id(sample) in first:
            together.wait()  # BrokenBarrierError unless the three are encoded at the same time
        return encode_sample(processor, sample, *args)

    monkeypatch.setattr(ahead, "encode_sample", encode)
    with BatchStream(processor, samples, 3, 256, 0, None, workers=3) as stream:
        got = list(stream)
    _assert_same_batches(got, inline)
    assert 0 < stream.first_ready_seconds < 10 and not together.broken


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_only_the_next_batches_are_pinned_on_one_thread(tiny_model, calibration, monkeypatch, kind):
    """Page-locked buffers stay few (each new one is a cudaHostAlloc holding CUDA's driver lock while the forward
    launches): however far the workers have encoded, one thread pins, at most PIN_AHEAD batches ahead of the
    consumer; the batches are the inline ones, bitwise."""
    processor = load_processor(tiny_model)
    samples = _samples(calibration)
    inline = list(batches(processor, samples, 2, 256))
    assert len(inline) > 2 * ahead.PIN_AHEAD
    made: dict = {}
    pinned = []  # per call: (thread, consumer's next batch)

    def pin(batch, floor):
        pinned.append((threading.current_thread().name, getattr(made.get("stream"), "next_index", 0)))
        floors.add(floor)
        return _fake_pinned(batch, floor)

    floors, reserved = set(), []
    monkeypatch.setattr(ahead, "_pinned", pin)
    monkeypatch.setattr(ahead, "_reserve_pinned", lambda *args: reserved.append(
        (threading.current_thread().name, len(pinned), *args)))
    with BatchStream(processor, samples, 2, 256, 0, None, workers=2, kind=kind, pin=True) as stream:
        made["stream"] = stream
        for part in [f for parts in list(stream.pending) for f in parts]:
            part.result()  # encoded ahead of the pinning
        for future in list(stream.pinning):
            future.result()
        assert len(pinned) == ahead.PIN_AHEAD
        got = list(stream)
    _assert_same_batches(got, inline)
    assert len(pinned) == len(inline)
    assert {thread for thread, _ in pinned} == {"reap-pin_0"}
    assert max(index - consumer for index, (_, consumer) in enumerate(pinned)) <= ahead.PIN_AHEAD
    # every batch into a buffer of one size, the largest a batch can take, reserved before the first batch's
    bound = ahead.batch_bytes_bound(processor, None, 2, 256, None)
    bound += bound // 16 + ahead.PIN_ALIGN * 16  # the model's inputs and the alignment
    assert floors == {bound} and reserved == [("reap-pin_0", 0, bound, ahead.PIN_BUFFERS)]
    monkeypatch.setattr(ahead, "PIN_FLOOR_MAX", bound - 1)  # too large to reserve: each batch its own size
    reserved.clear()
    floors.clear()
    with BatchStream(processor, samples, 2, 256, 0, None, workers=2, kind=kind, pin=True) as stream:
        _assert_same_batches(list(stream), inline)
    assert floors == {0} and not reserved
    with BatchStream(processor, samples, 2, 256, 0, None, workers=2, kind=kind, pin=True,
                     same_size_buffers=False) as stream:  # a consumer keeping every batch: each its own size
        list(stream)
    assert floors == {0} and not reserved


def test_a_stopiteration_from_encoding_is_an_error_not_the_streams_end(tiny_model, calibration, monkeypatch):
    """Raised inside ``__next__``, a StopIteration would end the iteration: batches silently lost."""
    processor = load_processor(tiny_model)
    samples = _samples(calibration)

    def encode(*args):
        raise StopIteration

    monkeypatch.setattr(ahead, "encode_sample", encode)
    for workers in (0, 2):
        with BatchStream(processor, samples, 2, 256, 0, None, workers=workers) as stream:
            with pytest.raises(RuntimeError, match="encoding batch 0 raised StopIteration"):
                list(stream)


def _encoded_with_warnings(make) -> tuple[list[dict], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = make()
    return got, [str(w.message) for w in caught if "fit REAP_MAX_SEQ_LEN" in str(w.message)]


def test_encoding_processes_give_the_inline_batches_in_order_with_their_warnings(tiny_model, calibration):
    """Bitwise the inline batches (pixels cast to the model's dtype, as the model would), in order; the warnings
    of images shrunk to fit, raised in the workers, come to this process in the inline order; no process is
    left once the stream is closed."""
    processor = load_processor(tiny_model)
    samples = _samples(calibration)
    inline, inline_warnings = _encoded_with_warnings(lambda: list(batches(processor, samples, 3, 16)))
    assert inline_warnings  # a budget that drops an image

    def ahead_batches():
        with BatchStream(processor, samples, 3, 16, 0, None, workers=2, kind="processes",
                         pixel_dtype=torch.bfloat16) as stream:
            assert len(multiprocessing.active_children()) == 2
            return list(stream), stream

    (got, stream), got_warnings = _encoded_with_warnings(ahead_batches)
    assert got_warnings == inline_warnings
    assert len(inline) == 5 and any("pixel_values" in b for b in inline)
    _assert_same_batches(got, inline, torch.bfloat16)
    assert stream.report(10, 9)["encode_kind"] == "processes" and stream.encode_seconds > 0
    assert multiprocessing.active_children() == []


def test_spawned_encoding_processes_get_the_processor_pickled(tiny_model, calibration, monkeypatch):
    """Where there is no fork (macOS, Windows) the workers are spawned and get the processor as a pickle: the same
    batches, bitwise."""
    processor = load_processor(tiny_model)
    samples = _samples(calibration)[:6]
    inline = list(batches(processor, samples, 3, 256))
    monkeypatch.setattr(ahead, "start_method", lambda: "spawn")
    with BatchStream(processor, samples, 3, 256, 0, None, workers=1, kind="processes") as stream:
        assert {p._start_method for p in multiprocessing.active_children()} == {"spawn"}
        got = list(stream)
    assert len(inline) == 2
    _assert_same_batches(got, inline)
    # A spawned worker was seen alive just after the stream closed in about one run of eight (cause not found; it
    # went away by itself): it must be gone within seconds.
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []


def test_pixels_cast_ahead_give_the_models_own_result(tiny_model, calibration):
    """The model's vision tower casts pixel values to its dtype before anything else: the batch cast in the
    encoding workers gives the same hidden states, bitwise."""
    ckpt = Checkpoint(tiny_model)
    processor = load_processor(tiny_model)
    model = load_model(tiny_model, dtype=torch.bfloat16)
    batch = next(batches(processor, load_calibration(calibration / "calibration_data.json", 2).samples, 2, 256))
    assert batch["pixel_values"].dtype == torch.float32
    cast = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
    base = ckpt.family.multimodal_model(model)
    with torch.inference_mode():
        want = base(**batch, use_cache=False).last_hidden_state
        got = base(**cast, use_cache=False).last_hidden_state
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["threads", "processes"])
@pytest.mark.parametrize("before", [4, 1])  # in the third batch; in the first, whose samples are encoded apart
@pytest.mark.parametrize("pin", [False, True])  # joined here, or on the pinning thread
def test_an_encoding_error_surfaces_at_its_batch_and_leaves_no_worker(tiny_model, calibration, tmp_path, kind,
                                                                      before, pin, monkeypatch):
    monkeypatch.setattr(ahead, "_pinned", _fake_pinned)
    processor = load_processor(tiny_model)
    good = _samples(calibration)[:4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = CalibrationSample(index=99, kind="prompt", text="<|vision_start|><|image_pad|><|vision_end|>x",
                            images=[broken])
    stream = BatchStream(processor, [*good[:before], bad, *good], 2, 256, 0, None, workers=2, kind=kind, pin=pin)
    with pytest.raises(ReapError, match="cannot read image .*broken.png"), stream:
        assert len([next(stream) for _ in range(before // 2)]) == before // 2  # the batches before it arrive
        next(stream)
    assert not _encode_threads()
    # by the OS's word: the pool's own thread may have reaped a worker we terminated, leaving multiprocessing's
    # record of it unfinished
    assert not any(_alive(child.pid) for child in multiprocessing.active_children())


@pytest.mark.parametrize("pin", [False, True])
@pytest.mark.parametrize("when", ["joined", "submitted"])
def test_an_encoding_process_that_dies_is_said_and_leaves_no_worker(tiny_model, calibration, monkeypatch, pin,
                                                                    when):
    """A worker process killed (the OOM killer, say) gives one line naming it and the fix, not a traceback of
    concurrent.futures: when its batch is joined (here or on the pinning thread), and when the next batch is
    handed to the broken pool after one that was encoded in time."""
    processor = load_processor(tiny_model)
    samples = _samples(calibration)[:6]
    doomed = samples[4 if when == "joined" else 2].index

    def encode(processor, sample, *args):
        if sample.index == doomed:
            time.sleep(0.5)  # the batch before is received first (its tensors' file descriptors die with us)
            os._exit(1)  # in the forked worker
        return encode_sample(processor, sample, *args)

    monkeypatch.setattr(ahead, "encode_sample", encode)
    monkeypatch.setattr(ahead, "_pinned", _fake_pinned)
    # submitted: one worker, batches of one, two in flight; batch 1 is received, batch 2 kills the worker, and
    # taking batch 1 hands batch 3 to the broken pool
    workers, size = (2, 2) if when == "joined" else (1, 1)
    with pytest.raises(ReapError, match="an encoding process died.*lower --encode-workers"), \
            BatchStream(processor, samples, size, 256, 0, None, workers=workers, kind="processes", pin=pin) as stream:
        if when == "submitted":
            next(stream)
            batch1, batch2 = [*[f for parts in stream.pending for f in parts], *stream.pinning]
            assert batch1.exception(timeout=30) is None and batch2.exception(timeout=30) is not None
            assert stream.submitted == 3
        list(stream)
    assert not _encode_threads()
    assert not any(_alive(child.pid) for child in multiprocessing.active_children())


def test_encoding_processes_end_when_their_parent_is_killed(tiny_model, calibration, tmp_path):
    """A parent killed outright (no cleanup runs) takes its encoding processes with it."""
    script = tmp_path / "parent.py"
    script.write_text(f"""
import multiprocessing, sys, time
from reap_vlm.calibration.ahead import BatchStream
from reap_vlm.calibration.files import load_calibration
from reap_vlm.checkpoint.loading import load_processor
if __name__ == "__main__":
    samples = load_calibration({str(calibration / "text.json")!r}, 100).samples
    stream = BatchStream(load_processor({str(tiny_model)!r}), samples, 1, 256, 0, None, workers=2,
                         kind="processes")
    next(stream)  # the workers are up
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    time.sleep(600)
""")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.wait()
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) is gone
        return f.read().split(") ")[-1][0] != "Z"


def test_auto_kind_is_processes_where_they_fork_and_shared_memory_has_room(tiny_model, monkeypatch):
    """As measured end to end (issue 18): processes win on text-heavy and on image-heavy sets (no GIL taken from the
    loop that launches the forward); auto falls back to threads where /dev/shm is short or processes would be
    spawned (seconds of imports); asked for, a kind is kept."""
    from reap_vlm.score.job import encode_workers

    processor = load_processor(tiny_model)
    settings = Settings(encode_workers=2, batch_size=3, max_seq_len=256)

    def kind() -> str:
        return encode_workers(settings, processor, None, torch.bfloat16)[1]

    assert kind() == "processes"
    settings.encode_workers_kind = "threads"
    assert kind() == "threads"
    settings.encode_workers_kind = "processes"
    assert kind() == "processes"
    settings.encode_workers_kind = "auto"
    with monkeypatch.context() as m:
        m.setattr(ahead, "shm_free_bytes", lambda: 1 << 20)
        assert kind() == "threads"
    with monkeypatch.context() as m:
        m.setattr(ahead.sys, "platform", "darwin")
        assert kind() == "threads"
    # /dev/shm is sized for the pixels the stream hands over: in the model's dtype (both engines cast them ahead),
    # bf16 on a GPU, half the processor's float32
    half = 2 * 2 * ahead.batch_bytes_bound(processor, None, 3, 256, torch.bfloat16)  # 2 workers, 2 batches each
    assert half < 2 * 2 * ahead.batch_bytes_bound(processor, None, 3, 256, None)
    with monkeypatch.context() as m:
        m.setattr(ahead, "shm_free_bytes", lambda: half)
        assert encode_workers(settings, processor, None, torch.bfloat16)[1] == "processes"
        assert encode_workers(settings, processor, None, None)[1] == "threads"


def test_too_little_shared_memory_is_said_before_any_process_starts(tiny_model, calibration, monkeypatch):
    """Processes, asked for, fork where they can (no start-up worth the name) and check /dev/shm before any starts,
    failing with the fix."""
    processor = load_processor(tiny_model)
    assert ahead.start_method() == "fork"  # Linux: CI and the GPU box
    with BatchStream(processor, _samples(calibration), 3, 256, 0, None, workers=2, kind="processes") as stream:
        # forked: the workers have torch, transformers and the processor already (spawned ones took ~12 s)
        assert {p._start_method for p in multiprocessing.active_children()} == {"fork"}
        assert len(list(stream)) == 5
    monkeypatch.setattr(ahead, "shm_free_bytes", lambda: 1 << 20)
    with pytest.raises(ReapError, match=r"/dev/shm has 0.0 GiB free.*--encode-workers-kind threads"):
        BatchStream(processor, _samples(calibration), 3, 256, 0, None, workers=2, kind="processes")
    assert multiprocessing.active_children() == []


def test_estimated_lengths_are_the_encoded_lengths_and_windows_sort_longest_first(tiny_model, calibration):
    processor = load_processor(tiny_model)
    samples = _samples(calibration)
    order, given = length_order(processor, samples, 2, 2, 256)
    encoded = [encode_sample(processor, s, 256).input_ids for s in samples]
    assert given.lengths == [ids.numel() for ids in encoded]  # no shrinking; the texts tokenized in one call
    texts = [render_text(processor, s) for s in samples]
    one_by_one = [text_token_count(processor, t) for t in texts]
    assert text_token_counts(processor, texts) == one_by_one
    assert text_token_counts(processor, texts * 100) == one_by_one * 100  # past one call's 512 texts
    assert given.image_tokens == [int((ids == processor.image_token_id).sum()) for ids in encoded]
    assert 0 < sum(given.image_tokens) < sum(given.lengths)
    position = {id(s): i for i, s in enumerate(samples)}  # the two files' indices overlap
    moved = [position[id(s)] for s in order.samples]
    assert moved != list(range(len(samples)))
    assert len(samples) % 4 == 3
    for start in range(0, len(samples), 4):  # windows of 2 batches of 2: longest first, but in the short last one
        window = order.lengths[start:start + 4]
        assert window == sorted(window, reverse=len(window) == 4)
        assert sorted(moved[start:start + 4]) == list(range(start, min(start + 4, len(samples))))
    whole, _ = length_order(processor, samples, 2, 8, 256)  # one window
    assert padding_share(whole.lengths, 2) < padding_share(given.lengths, 2) / 2
    assert length_order(processor, samples, 2, 2, 256)[0].samples == order.samples  # deterministic
    for window, batch_size in ((0, 4), (8, 1)):  # off, or nothing to pad
        unsorted, _ = length_order(processor, samples, batch_size, window, 256)
        assert unsorted.samples == samples and unsorted.window == 0


def test_a_batch_costs_its_padded_positions_and_its_image_tokens_through_the_vision_tower(tiny_model, calibration):
    processor = load_processor(tiny_model)
    order, _ = length_order(processor, _samples(calibration), 2, 8, 256)
    cost = ForwardCost(per_position=3.0, per_image_token=7.0)
    costs = order.batch_costs(2, cost)
    assert len(costs) == num_batches(order.samples, 2)
    for b, got in enumerate(costs):
        lengths, images = order.lengths[2 * b:2 * b + 2], order.image_tokens[2 * b:2 * b + 2]
        assert got == 3.0 * max(lengths) * len(lengths) + 7.0 * sum(images)
    assert order.batch_costs(2, ForwardCost(1.0)) == padded_positions(order.lengths, 2)  # no vision: positions
    unsorted, _ = length_order(processor, _samples(calibration), 2, 0, 256)
    assert unsorted.batch_costs(2, cost) == []  # not estimated: torchrun shares round-robin


def test_a_sample_known_too_long_goes_straight_to_smaller_images_with_the_same_result(tiny_model, tmp_path,
                                                                                     monkeypatch):
    """encode_sample skips encoding photos at full size when the processor's own count says they cannot fit, and
    skips every smaller size the count says cannot fit either: the processor runs once per sample, and the tokens
    and pixels are those of encoding first and tightening by encoding after."""
    from PIL import Image

    import reap_vlm.calibration.encode as encode

    processor = load_processor(tiny_model)
    samples = []
    for i, size in enumerate([(300, 200), (160, 160), (90, 400)]):
        path = tmp_path / f"{i}.png"
        Image.effect_noise(size, 40).convert("RGB").save(path)
        samples.append(CalibrationSample(index=i, kind="chat", images=[path], messages=[{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]))
    budgets = range(8, 60, 3)

    calls = []
    real_encode = encode._encode
    monkeypatch.setattr(encode, "_encode", lambda *a: calls.append(1) or real_encode(*a))

    def encode_all():
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scaled down / dropped to fit
            return [encode_sample(processor, s, n) for n in budgets for s in samples], len(calls)

    direct, direct_calls = encode_all()
    monkeypatch.setattr(encode, "image_token_count", lambda *a: None)  # a processor that cannot count
    first_full, first_full_calls = encode_all()
    assert direct_calls == len(direct) < first_full_calls - len(samples)  # once per sample, no size tried twice
    for a, b in zip(direct, first_full):
        for field in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), field
    image_tokens = [int(e.image_grid_thw.prod()) // 4 if e.image_grid_thw is not None else 0 for e in direct]
    assert 0 in image_tokens and len(set(image_tokens)) > 4  # dropped, scaled down to several sizes, whole


def _float64_stats(model, processor, ckpt, samples, mode) -> tuple[ExpertStats, dict]:
    stats = ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts)
    run = run_batches(model, processor, samples, ReapObserver(ckpt.family, stats, mode), batch_size=3,
                      max_seq_len=256, max_pixels=0, resume=None, checkpoint_every=1, device="cpu",
                      encode_workers=2)
    return stats, run


@pytest.mark.parametrize("mode", ["full", "routed"])
def test_sorted_batches_give_the_same_selection_and_scores_within_1e12(tiny_model, calibration, mode):
    """In float64 a token's expert outputs do not depend on its batch-mates beyond rounding, so sorting changes
    the scores only by float64 summation order."""
    ckpt = Checkpoint(tiny_model)
    processor = load_processor(tiny_model)
    model = load_model(tiny_model, dtype=torch.float64)
    for _, block in ckpt.family.moe_blocks(model):
        block.experts.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    samples = _samples(calibration)
    order, given = length_order(processor, samples, 3, 8, 256)
    assert order.samples != given.samples
    plain, plain_run = _float64_stats(model, processor, ckpt, given.samples, mode)
    sorted_, sorted_run = _float64_stats(model, processor, ckpt, order.samples, mode)
    assert sorted_run["padding_share"] < plain_run["padding_share"]
    assert sorted_run["tokens_this_run"] == plain_run["tokens_this_run"]
    plain_metrics, sorted_metrics = plain.metrics(mode), sorted_.metrics(mode)
    for name, rows in plain_metrics.items():
        np.testing.assert_allclose(np.array(sorted_metrics[name]), np.array(rows), rtol=1e-12, atol=0, err_msg=name)
    for criterion in ("reap", "frequency"):
        assert (select_experts(sorted_metrics, ckpt.moe_layers, criterion, 8)
                == select_experts(plain_metrics, ckpt.moe_layers, criterion, 8))


def _settings(model, calib_file, out, **kw) -> Settings:
    base = dict(model_path=Path(model), calibration_path=Path(calib_file), output_path=Path(out), device="cpu",
                dtype="float32", prune_ratio=0.25, max_samples=100, resume=True, batch_size=2, checkpoint_every=1,
                encode_workers=2)
    base.update(kw)
    return Settings(**base)


def test_a_resumed_sorted_run_uses_the_recorded_order(tiny_model, calibration, tmp_path):
    calib = calibration / "text.json"
    whole = run_reap(_settings(tiny_model, calib, tmp_path / "whole", resume=False, sort_window=4))
    run = whole["run"]
    assert run["sort_window"] == 4 and sorted(run["sample_order"]) == whole["calibration_samples"]
    assert run["sample_order"] != whole["calibration_samples"]
    assert run["padding_share"] == pytest.approx(run["padding_share_estimated"], abs=1e-4)
    assert 0 < run["padding_share_file_order_estimated"] < 1
    # encoded by processes, killed and resumed: the thread-encoded run's sums, bitwise
    killed = _settings(tiny_model, calib, tmp_path / "killed", sort_window=4, encode_workers_kind="processes")
    with stop_after(2):
        run_reap(killed)
    resumed = run_reap(killed)
    assert resumed["run"]["resumed_from"] == 2 and resumed["run"]["encode_kind"] == "processes"
    assert resumed["metrics"] == whole["metrics"]  # bitwise: same batches in the same order
    # another window is another batch order: the saved sums are not reused
    other = run_reap(_settings(tiny_model, calib, tmp_path / "killed", sort_window=0))
    assert other["run"]["resumed_from"] == 0 and other["run"]["sort_window"] == 0
    np.testing.assert_allclose(np.array(other["metrics"]["reap"]), np.array(whole["metrics"]["reap"]), rtol=1e-5)
    assert other["experts_to_keep"] == whole["experts_to_keep"]


def test_reap_py_ends_its_encoding_processes_on_an_error_while_the_model_loads(tiny_model, calibration, tmp_path,
                                                                              monkeypatch):
    """reap.py starts its encoding processes before it loads the model (they encode meanwhile): an error while
    loading still leaves none behind."""
    import reap_vlm.score.job as job

    started = []
    real = ahead.EncodingProcesses
    monkeypatch.setattr(ahead, "EncodingProcesses", lambda *a, **kw: started.append(real(*a, **kw)) or started[-1])

    def fail(*args, **kwargs):
        raise ReapError("stopped while loading")

    monkeypatch.setattr(job, "load_model", fail)
    with pytest.raises(ReapError, match="stopped while loading"):
        run_reap(_settings(tiny_model, calibration / "text.json", tmp_path / "out", encode_workers_kind="processes"))
    assert len(started) == 1 and started[0].pool is None  # started, then closed
    assert multiprocessing.active_children() == []


# ------------------------------------------------------------------------------------- warm-up while loading


def test_warm_up_steps_run_in_order_on_one_thread_and_a_failed_one_is_said(caplog):
    from reap_vlm.score.warmup import WarmUp

    ran = []

    def step(name, fail=False):
        def work():
            ran.append((name, threading.current_thread().name))
            time.sleep(0.05)
            if fail:
                raise RuntimeError("no compiler here")
            return {"did": name}
        return work

    warm = WarmUp()
    assert warm.report() == {}
    warm.add("first", step("first"))
    warm.add("broken", step("broken", fail=True))
    warm.add("last", step("last"))
    warm.add("nothing", None)
    with caplog.at_level("WARNING"):
        warm.wait()
    assert ran == [("first", "reap-warm-up"), ("broken", "reap-warm-up"), ("last", "reap-warm-up")]
    report = warm.report()
    assert report["first"]["did"] == "first" and report["last"]["did"] == "last"
    assert report["broken"]["error"] == "no compiler here" and "nothing" not in report
    assert all(report[n]["seconds"] >= 0.05 for n in ("first", "broken", "last")) and report["waited_s"] > 0
    assert "warm-up step 'broken' failed (no compiler here); the first batch does its work" in caplog.text
    warm.add("too late", step("too late"))  # after wait: never run
    warm.wait()
    assert len(ran) == 3 and not any(t.name == "reap-warm-up" for t in threading.enumerate())


def test_no_warm_up_step_runs_while_it_is_held_quiet():
    """reap.py forks its encoding processes inside ``quiet``: no step runs within it (one running ends first)."""
    from reap_vlm.score.warmup import WarmUp

    spans: dict[str, list[float]] = {}

    def step(name):
        def work():
            spans[name] = [time.perf_counter()]
            time.sleep(0.2)
            spans[name].append(time.perf_counter())
        return work

    warm = WarmUp()
    warm.add("running", step("running"))
    while "running" not in spans:
        time.sleep(0.01)
    warm.add("next", step("next"))
    with warm.quiet():
        inside = time.perf_counter()
        time.sleep(0.3)
        left = time.perf_counter()
    warm.wait()
    assert len(spans) == 2 and all(end <= inside or start >= left for start, end in spans.values())


def test_an_abandoned_warm_up_is_not_waited_for():
    from reap_vlm.score.warmup import WarmUp

    release = threading.Event()
    warm = WarmUp()
    warm.add("slow", lambda: release.wait(5) and {})
    warm.add("after", lambda: {"ran": True})
    t0 = time.perf_counter()
    with pytest.raises(ValueError), warm:
        raise ValueError("bad input")
    assert time.perf_counter() - t0 < 1  # the error is said at once
    release.set()
    for _ in range(100):
        if not any(t.name == "reap-warm-up" for t in threading.enumerate()):
            break
        time.sleep(0.05)
    assert not any(t.name == "reap-warm-up" for t in threading.enumerate())
    assert "slow" in warm.report() and "after" not in warm.report()  # the step running ended; the next, dropped


def test_a_rerun_with_nothing_left_to_score_drops_the_warm_ups_steps_not_begun(tiny_model, calibration, tmp_path,
                                                                              monkeypatch):
    import reap_vlm.score.job as job

    abandoned, ran = threading.Event(), []

    class Warming(job.ScoringWarmUp):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps.add("running", lambda: {"abandoned": abandoned.wait(10)})  # until the job gives up
            self.steps.add("not begun", lambda: ran.append("not begun"))

        def abandon(self):
            super().abandon()
            abandoned.set()

    settings = _settings(tiny_model, calibration / "text.json", tmp_path / "out", sort_window=4)
    run_reap(settings)
    monkeypatch.setattr(job, "ScoringWarmUp", Warming)
    t0 = time.perf_counter()
    again = run_reap(settings)  # scored before: selects again, loads nothing
    assert again["run"]["resumed_from"] == again["run"]["batches"] and abandoned.is_set()
    assert ran == [] and time.perf_counter() - t0 < 5  # the running step ended, the next was dropped
    assert not any(t.name == "reap-warm-up" for t in threading.enumerate())


def test_quiet_waits_for_the_step_running_only():
    """A fork inside ``quiet`` waits for the step running, not for the steps queued behind it (Python's locks are
    not fair: the thread would take the next step first)."""
    from reap_vlm.score.warmup import WarmUp

    started = threading.Event()

    def step(seconds):
        def work():
            started.set()
            time.sleep(seconds)
        return work

    warm = WarmUp()
    warm.add("running", step(0.3))
    warm.add("queued", step(1.0))
    warm.add("queued too", step(1.0))
    started.wait(5)
    t0 = time.perf_counter()
    with warm.quiet():
        held = time.perf_counter() - t0
    warm.abandon()
    warm.wait()
    assert held < 0.9 and "running" in warm.results and "queued too" not in warm.results


@pytest.mark.parametrize("engine", ["model", "layerwise"])
def test_reap_py_warms_up_while_it_loads_and_scores_only_once_the_warm_up_is_done(tiny_model, calibration, tmp_path,
                                                                                  monkeypatch, engine):
    """The warm-up (CUDA only: faked here by steps added on the CPU) runs while reap.py reads its inputs and loads the
    model; the first expert call waits for it; a failed step changes nothing but a warning."""
    import reap_vlm.score.job as job
    from reap_vlm.score.hooks import ReapObserver as Observer

    events: dict[str, float] = {}

    class FakeWarming(job.ScoringWarmUp):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            events["started"] = time.perf_counter()
            self.steps.add("slow", self._slow)
            self.steps.add("broken", lambda: 1 / 0)

        def _slow(self):
            time.sleep(0.4)
            events["slow_done"] = time.perf_counter()
            return {"counts_known": None}

        def tune(self, done):
            self.steps.add("tuned", lambda: {"counts": self.counts[done:]})

    observe = Observer.observe

    def first_observe(self, *args, **kwargs):
        observe(self, *args, **kwargs)
        events.setdefault("first_observe", time.perf_counter())  # its first batch's sums added

    monkeypatch.setattr(Observer, "observe", first_observe)
    settings = _settings(tiny_model, calibration / "text.json", tmp_path / "plain", engine=engine, resume=False,
                         scoring_mode="full", sort_window=4)
    plain = run_reap(settings)
    assert "warm_up" not in plain["run"]  # on the CPU: nothing to warm up
    monkeypatch.setattr(job, "ScoringWarmUp", FakeWarming)
    events.clear()
    warmed = run_reap(_settings(tiny_model, calibration / "text.json", tmp_path / "warmed", engine=engine,
                                resume=False, scoring_mode="full", sort_window=4))
    report = warmed["run"]["warm_up"]
    assert report["slow"]["seconds"] >= 0.4 and report["broken"]["error"] == "division by zero"
    assert events["started"] < events["slow_done"] < events["first_observe"]
    if engine == "model":  # the layer-wise engine has no scratch to tune on
        # the tuning step got this run's batches' estimated lengths: the encoded batches' valid tokens (text: exact)
        assert sum(report["tuned"]["counts"]) == warmed["num_tokens"]["total"]
        assert len(report["tuned"]["counts"]) == warmed["run"]["batches"]
    else:
        assert "tuned" not in report
    assert warmed["metrics"] == plain["metrics"]


def test_the_full_modes_kernels_are_tuned_at_the_largest_batch_before_the_lengths_are_known(tiny_model, tmp_path,
                                                                                           monkeypatch):
    """On a GPU (faked: the steps' device work stood in for), the fused kernels are compiled, then tuned at once at
    the largest batch (--batch-size x --max-seq-len), with the room the loaded model will leave; the batches' own
    lengths are tuned once known.  The layer-wise engine tunes nothing ahead."""
    import reap_vlm.score.warmup as warmup

    tuned: list[tuple[list[int], int, int]] = []

    class Kernels:
        reference_bytes_per_row = 1 << 10

        def compile(self):
            return {"kernels": 2}

        def tune(self, counts, room, chunk):
            tuned.append((list(counts), room, chunk))
            return {"buckets": len(counts)}

    ckpt = Checkpoint(tiny_model)
    monkeypatch.setattr(ckpt.family, "full_scoring_warm_up", lambda *args: Kernels())
    monkeypatch.setattr(warmup, "start_cuda_libraries", lambda *args, **kwargs: {})
    loaded_on = []
    monkeypatch.setattr(warmup, "load_forward_kernels",
                        lambda gpu, *args, **kwargs: loaded_on.append(gpu) or {"ops": 3})
    monkeypatch.setattr(warmup, "spreads", lambda *args: False)
    monkeypatch.setattr(warmup, "free_memory_bytes", lambda device: 10 << 30)
    monkeypatch.setattr(warmup, "model_bytes", lambda ckpt: 2 << 30)
    settings = _settings(tiny_model, tmp_path / "unused.json", tmp_path / "out", scoring_mode="full", batch_size=4,
                         max_seq_len=96)
    for engine in ("model", "layerwise"):
        tuned.clear()
        with warmup.ScoringWarmUp(settings, ckpt, engine, torch.bfloat16, "cuda:0", DistContext()) as warm:
            warm.batches([300, 200, 90])
            warm.tune(1)
        report = warm.report()["warm_up"]
        if engine == "layerwise":
            assert tuned == [] and "fused kernels tuned, largest batch" not in report
            continue
        room = (10 << 30) - (2 << 30)
        chunk = warmup.tokens_per_chunk(min(room // 2, warmup.CUDA_CHUNK_CAP), Kernels.reference_bytes_per_row)
        assert tuned == [([4 * 96], room // 4, chunk), ([200, 90], room // 4, chunk)]
        assert list(report)[:5] == ["cuda libraries", "fused kernels compiled", "fused kernels tuned, largest batch",
                                    "forward kernels", "fused kernels tuned"]
        assert report["forward kernels"]["ops"] == 3 and loaded_on[-1] == torch.device("cuda", 0)  # the model's GPU


def test_a_ranks_estimated_batch_tokens_are_its_encoded_batches(tiny_model, calibration):
    from reap_vlm.score.distributed import DistContext

    processor = load_processor(tiny_model)
    samples = load_calibration(calibration / "text.json", 100).samples
    order, _ = length_order(processor, samples, 2, 4, 256)
    for rank in range(2):
        share = DistContext(rank=rank, world_size=2, local_rank=rank).my_samples(order.samples, 2)
        encoded = [int(b["attention_mask"].sum()) for b in batches(processor, share, 2, 256)]
        assert order.batch_tokens(share, 2) == encoded
    unsorted, _ = length_order(processor, samples, 2, 0, 256)
    assert unsorted.batch_tokens(samples, 2) == []


def _recorded_kernels(monkeypatch) -> list[int]:
    """``triton_experts``' kernels stood in for by the bmm path (on the CPU), the rows of every call recorded, every
    timing 1 s (so the race is run and the kernels win it), its process-wide choices fresh."""
    from reap_vlm.families import QWEN3_VL_MOE
    from reap_vlm.score import triton_experts

    calls: list[int] = []

    def kernels(experts, x, config=None):
        calls.append(x.shape[0])
        return QWEN3_VL_MOE._all_expert_norms_bmm(experts, x)

    monkeypatch.setattr(triton_experts, "available", lambda experts, x: True)
    monkeypatch.setattr(triton_experts, "all_expert_norms", kernels)
    monkeypatch.setattr(triton_experts, "_seconds", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(triton_experts, "_state", {"checked": False, "broken": None})
    monkeypatch.setattr(triton_experts, "_choice", {})
    return calls


def _small_experts():
    from types import SimpleNamespace

    num, inter, hidden = 8, 48, 96
    return SimpleNamespace(gate_up_proj=torch.randn(num, 2 * inter, hidden), down_proj=torch.randn(num, hidden, inter),
                           num_experts=num, act_fn=torch.nn.functional.silu)


def test_the_kernels_are_tuned_ahead_at_the_buckets_their_calls_use(monkeypatch):
    """``tuning_plan`` plans the first call's race (its check, its probe) and one autotuning per other bucket that
    the full mode's calls of the fused kernels will use, each batch's rows cut into chunks as
    ``norms.all_expert_norms`` cuts them.  The calls are recorded through ``fastest`` itself."""
    from reap_vlm.families import QWEN3_VL_MOE
    from reap_vlm.score import norms, triton_experts

    experts = _small_experts()
    shape, dtype, hidden = tuple(experts.gate_up_proj.shape), torch.float32, experts.gate_up_proj.shape[2]
    reference = QWEN3_VL_MOE.full_bytes_per_token(experts, dtype)
    calls = _recorded_kernels(monkeypatch)
    budget = 4700 * reference  # chunks of 4,608 rows
    counts = [5000, 2500, 700, 40, 9000, 1100]
    for count in counts:
        norms.all_expert_norms(QWEN3_VL_MOE, experts, torch.randn(count, hidden), chunk_budget_bytes=budget)
    chunk = norms.tokens_per_chunk(budget, reference)
    assert chunk == 4608
    probe = triton_experts.timed_rows(experts, chunk, dtype, reference)
    raced = [probe] * (1 + triton_experts._RACE_RUNS)  # warmed once, then timed
    assert calls == [64, 4608, *raced, 392, 2500, 700, 40, 4608, 4392, 1100]
    bucket = triton_experts.bucket_of
    first, rows = triton_experts.tuning_plan(shape, dtype, counts, reference, chunk, room_bytes=1 << 40)
    assert first == 4608 and rows == sorted(rows)  # the first call raced: its check's and probe's buckets with it
    assert {bucket(n) for n in calls} == {bucket(n) for n in [first, 64, probe, *rows]}
    assert not {bucket(n) for n in rows} & {bucket(n) for n in (first, 64, probe)}  # nothing tuned twice
    # 8,192 rows and more share one autotuning
    assert bucket(8191) == 13 and bucket(8192) == bucket(16384) == 14
    # a later batch longer than the first in its bucket: that bucket tuned by the race, on the first's rows
    assert triton_experts.tuning_plan(shape, dtype, [3000, 4000, 900], reference, 30000, 1 << 40) == (3000, [900])
    assert triton_experts.tuning_plan(shape, dtype, [9000, 20000, 13000], reference, 30000, 1 << 40) == (9000, [])
    assert triton_experts.tuning_plan(shape, dtype, [], reference, chunk, 1 << 40) == (0, [])
    # where memory is short, what does not fit is left to the first batch
    room = triton_experts.scratch_bytes(shape, 1100, dtype)
    assert triton_experts.tuning_plan(shape, dtype, counts, reference, chunk, room) == (0, [40, 392, 700, 1100])


@pytest.mark.parametrize("counts", [[5000, 2500, 700, 40, 9000, 1100], [3000, 3500], [9000, 20000, 13000]])
def test_tuning_ahead_runs_what_it_planned_and_the_run_keeps_its_race(monkeypatch, counts):
    """``KernelWarmUp.tune`` on scratch experts (here on the CPU, the kernels stood in for): the first call's race
    and the planned buckets run, the race's choice is kept for the real experts' shape, and their first call
    neither checks nor races again."""
    from reap_vlm.families import QWEN3_VL_MOE
    from reap_vlm.score import triton_experts

    experts = _small_experts()
    shape, dtype = tuple(experts.gate_up_proj.shape), torch.float32
    reference = QWEN3_VL_MOE.full_bytes_per_token(experts, dtype)
    calls = _recorded_kernels(monkeypatch)
    warm = triton_experts.KernelWarmUp(shape, dtype, [torch.device("cpu")], QWEN3_VL_MOE._all_expert_norms_bmm,
                                       reference)
    done = warm.tune(counts, room_bytes=1 << 40, chunk=4608)
    first, rows = triton_experts.tuning_plan(shape, dtype, counts, reference, 4608, 1 << 40)
    bucket = triton_experts.bucket_of
    raced = triton_experts.timed_rows(experts, first, dtype, reference) >= triton_experts._MIN_TIMED_ROWS
    assert done["path"] == ("triton" if raced else None)  # a probe under 1,024 rows: a later call races
    assert done["buckets"] == sorted({bucket(n) for n in [first, *rows]})
    assert calls[:2] == [64, first] and calls[-len(rows) or len(calls):] == rows
    assert triton_experts._state["checked"] and not triton_experts._state["broken"]
    calls.clear()
    x = torch.randn(first, shape[2])
    triton_experts.fastest(experts, x, QWEN3_VL_MOE._all_expert_norms_bmm, reference)
    assert calls == [first]  # no check (64 rows), no race: only the call itself


def test_the_full_modes_warm_up_is_the_fused_kernels_the_run_will_call(monkeypatch):
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    from reap_vlm.families import QWEN3_VL_MOE
    from reap_vlm.score import triton_experts

    text = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, hidden_act="silu")
    config = {"model_type": "qwen3_vl_moe", "text_config": text}
    gpu = [torch.device("cuda", 0)]
    warm = QWEN3_VL_MOE.full_scoring_warm_up(config, torch.bfloat16, gpu)
    with torch.device("meta"):
        experts = Qwen3VLMoeTextExperts(Qwen3VLMoeTextConfig(**text)).to(torch.bfloat16)
    assert warm.shape == tuple(experts.gate_up_proj.shape) == (128, 1536, 2048)
    assert warm.reference_bytes_per_row == QWEN3_VL_MOE.full_bytes_per_token(experts, torch.bfloat16)
    assert warm.reference == QWEN3_VL_MOE._all_expert_norms_bmm  # the path fastest races the kernels against
    assert warm.devices == gpu and warm.dtype == torch.bfloat16
    # where the kernels will not run, nothing is warmed up
    assert QWEN3_VL_MOE.full_scoring_warm_up(config, torch.float32, gpu) is None
    assert QWEN3_VL_MOE.full_scoring_warm_up(config, torch.bfloat16, [torch.device("cpu")]) is None
    gelu = {"model_type": "qwen3_vl_moe", "text_config": {**text, "hidden_act": "gelu"}}
    assert QWEN3_VL_MOE.full_scoring_warm_up(gelu, torch.bfloat16, gpu) is None
    monkeypatch.setenv("REAP_FULL_KERNEL", "torch")
    assert QWEN3_VL_MOE.full_scoring_warm_up(config, torch.bfloat16, gpu) is None
    monkeypatch.setattr(triton_experts, "triton", None)
    monkeypatch.delenv("REAP_FULL_KERNEL")
    assert QWEN3_VL_MOE.full_scoring_warm_up(config, torch.bfloat16, gpu) is None


def test_cuda_libraries_start_at_the_models_widths(tiny_model):
    from reap_vlm.score.warmup import model_widths

    text = json.loads((tiny_model / "config.json").read_text())["text_config"]
    assert model_widths(Checkpoint(tiny_model)) == {"hidden": text["hidden_size"], "heads": text["num_attention_heads"],
                                                   "head_dim": text["head_dim"],
                                                   "intermediate": text["moe_intermediate_size"],
                                                   "experts": text["num_experts"], "top_k": text["num_experts_per_tok"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_forward_kernels_warm_up_runs_every_op_at_the_models_widths(tiny_model, dtype):
    """Every op of the list is valid at a model's widths (an error would end the step early, silently but for the
    log: the ops after it would load in the first batch); the grouped matmul where torch has it, in bf16."""
    from reap_vlm.score.warmup import load_forward_kernels, model_widths

    ops = load_forward_kernels("cpu", dtype, **model_widths(Checkpoint(tiny_model)))["ops"]
    assert ops == 36 + (dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"))


@pytest.mark.parametrize("hidden,intermediate,experts,top_k", [(32, 24, 12, 3), (63, 30, 12, 3), (100, 30, 7, 2),
                                                               (2, 3, 4, 8)])
def test_the_forward_kernels_warm_up_keeps_in_range_at_any_width(hidden, intermediate, experts, top_k):
    """Narrow, odd or unaligned widths, fewer experts than top_k: every op still runs (an index out of range would be
    a device-side assert on a GPU, which ends the process); the grouped matmul only where its strides allow."""
    from reap_vlm.score.warmup import load_forward_kernels

    for dtype in (torch.float32, torch.bfloat16):
        ops = load_forward_kernels("cpu", dtype, hidden=hidden, intermediate=intermediate, experts=experts,
                                   top_k=top_k)["ops"]
        aligned = hidden % 8 == intermediate % 8 == 0
        assert ops == 36 + (dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm"))
