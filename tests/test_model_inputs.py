"""Inputs the model would derive on its device, computed by the encoding workers on the host instead
(``ModelFamily.model_inputs``): the model's output and the REAP sums bitwise those of the model computing them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from reap_vlm.calibration.ahead import PIN_ALIGN, BatchStream, model_batch, packed
from reap_vlm.calibration.encode import encode_sample, to_model
from reap_vlm.calibration.files import load_calibration
from reap_vlm.checkpoint.loading import load_model, load_processor
from reap_vlm.checkpoint.reader import Checkpoint
from reap_vlm.errors import ReapError
from reap_vlm.fixtures.families import FIXTURES
from reap_vlm.inference import inference
from reap_vlm.score.engine import run_batches
from reap_vlm.score.hooks import ReapObserver
from reap_vlm.score.stats import ExpertStats

COMPUTED_ON_THE_HOST = {"qwen3_vl_moe", "qwen3_5_moe"}  # the others: the model computes every input itself
VISION = [name for name, fixture in FIXTURES.items() if fixture.family.has_vision]


@pytest.fixture(scope="module", params=VISION)
def vision_case(request, tmp_path_factory):
    name = request.param
    fixture = FIXTURES[name]
    root = tmp_path_factory.mktemp(name)
    return name, fixture.family, fixture.build(root / "release"), fixture.calibration(root / "calibration")


def _mixed_batch(processor, family, calib_file: Path) -> dict[str, torch.Tensor]:
    """Rows with an image and rows of text alone, of different lengths (padding)."""
    samples = load_calibration(calib_file, 100).samples
    with_image = [s for s in samples if s.images][:2]
    texts = [s for s in samples if not s.images][:1] or [
        s for s in load_calibration(calib_file.parent / "text.json", 100).samples][:1]
    return [encode_sample(processor, s, 512, 0, family) for s in with_image + texts]


def _last_hidden(model, family, batch: dict) -> torch.Tensor:
    moved = to_model(batch, "cpu", model.dtype, host=family.host_side(batch, model))
    with inference():
        return family.multimodal_model(model)(**moved, use_cache=False).last_hidden_state


def test_inputs_from_the_host_give_the_models_own_output(vision_case):
    name, family, path, calib_file = vision_case
    processor, config = load_processor(path), Checkpoint(path).config
    model = load_model(path)
    encoded = _mixed_batch(processor, family, calib_file)
    plain = model_batch(encoded, processor, family, None)
    given = model_batch(encoded, processor, family, config)
    extra = set(given) - set(plain)
    if name not in COMPUTED_ON_THE_HOST:
        assert not extra and family.host_side(given, model) == set()
        return
    assert extra == {"image_interp_indices", "image_interp_weights", "image_position_ids", "image_cu_seqlens",
                     "position_ids"}
    assert family.host_side(given, model) == {"image_grid_thw", "image_cu_seqlens"}  # SDPA's vision attention
    assert (given["attention_mask"] == 0).any()  # padded rows
    want = _last_hidden(model, family, plain)
    assert torch.equal(_last_hidden(model, family, given), want)
    # each input is used, not recomputed: wrong values change the output
    for key in ("image_position_ids", "position_ids", "image_interp_weights"):
        wrong = dict(given, **{key: given[key].flip(0)})
        assert not torch.equal(_last_hidden(model, family, wrong), want), key
    # a vision tower that resamples its positions otherwise (another transformers) is said, not run wrong
    model.model.visual.interpolation_mode = "bicubic"
    with pytest.raises(ReapError, match="resamples its positions"):
        family.host_side(given, model)
    # a batch of text alone needs none
    assert model_batch(encoded[2:], processor, family, config).keys() == model_batch(encoded[2:], processor, family,
                                                                                       None).keys()


def test_an_unknown_transformers_leaves_the_inputs_to_the_model(vision_case, monkeypatch):
    name, family, path, calib_file = vision_case
    if name not in COMPUTED_ON_THE_HOST:
        return
    processor = load_processor(path)
    encoded = _mixed_batch(processor, family, calib_file)
    monkeypatch.setattr(type(family), "rope_index_model", ("transformers.models.no_such_model", "Model"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = model_batch(encoded, processor, family, Checkpoint(path).config)
    assert batch.keys() == model_batch(encoded, processor, family, None).keys()
    assert any("could not be computed ahead" in str(w.message) for w in caught)


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_workers_give_the_inputs_and_the_sums_stay_bitwise(tiny_model, calibration, kind):
    """Threads and processes compute the inputs as inline encoding does (the first batch's samples apart, joined
    here); the engine's REAP sums with them are bitwise those without."""
    processor, ckpt = load_processor(tiny_model), Checkpoint(tiny_model)
    samples = load_calibration(calibration / "calibration_data.json", 100).samples
    with BatchStream(processor, samples, 3, 256, 0, None, workers=0, model_config=ckpt.config) as stream:
        inline = list(stream)
    with BatchStream(processor, samples, 3, 256, 0, None, workers=2, kind=kind, model_config=ckpt.config) as stream:
        ahead = list(stream)
    assert all(("position_ids" in b) == ("image_grid_thw" in b) for b in inline)
    assert any("position_ids" in b for b in inline) and len(ahead) == len(inline)
    for got, want in zip(ahead, inline):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    model = load_model(tiny_model)
    sums = []
    for config in (None, ckpt.config):
        observer = ReapObserver(ckpt.family, ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, "cpu"), "full")
        stream = BatchStream(processor, samples, 3, 256, 0, None, workers=0, model_config=config)
        run_batches(model, processor, samples, observer, batch_size=3, max_seq_len=256, max_pixels=0, resume=None,
                    checkpoint_every=100, device="cpu", stream=stream)
        sums.append(observer.stats)
    assert sums[0].n_image_tokens > 0
    _assert_bitwise(sums[1].state_dict(), sums[0].state_dict())


def _assert_bitwise(got, want, where: str = "") -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_bitwise(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    else:
        assert got == want, where


def test_a_batch_packs_into_one_buffer_with_the_same_tensors(tiny_model, calibration):
    """Pinned as one buffer (one page-locked allocation per batch): every tensor the same values, dtype and shape,
    a view of the one buffer at an aligned offset; empty and non-contiguous tensors too."""
    processor, ckpt = load_processor(tiny_model), Checkpoint(tiny_model)
    samples = load_calibration(calibration / "calibration_data.json", 100).samples
    encoded = [encode_sample(processor, s, 256, 0, ckpt.family) for s in samples[:3]]
    batch = model_batch(encoded, processor, ckpt.family, ckpt.config)
    batch["empty"] = torch.zeros(0, 3, dtype=torch.int32)
    batch["strided"] = torch.arange(12, dtype=torch.float64).reshape(3, 4).T
    batch["flags"] = torch.tensor([True, False, True])
    out = packed(batch, pin_memory=False)
    assert out.keys() == batch.keys()
    storages = {v.untyped_storage().data_ptr() for v in out.values() if v.numel()}
    assert len(storages) == 1
    for key, want in batch.items():
        got = out[key]
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
        assert (got.data_ptr() - next(iter(storages))) % PIN_ALIGN == 0, key


def test_image_tokens_without_their_image_leave_the_inputs_to_the_model(tiny_model, calibration):
    """A text that holds a literal image placeholder token, beside a sample with an image: the image tokens and
    the images disagree, so nothing is computed ahead (get_rope_index's StopIteration would end the stream) and
    the model says what is wrong, as without the inputs."""
    processor, ckpt = load_processor(tiny_model), Checkpoint(tiny_model)
    samples = load_calibration(calibration / "calibration_data.json", 100).samples
    encoded = [encode_sample(processor, s, 256, 0, ckpt.family) for s in samples if s.images][:1]
    image_id = ckpt.config["image_token_id"]
    text = encoded[0].input_ids[:5].clone()
    text[2] = image_id
    encoded.append(type(encoded[0])(text, None, None, torch.tensor([0, 0, 1, 0, 0], dtype=torch.int32)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = model_batch(encoded, processor, ckpt.family, ckpt.config)
    assert "position_ids" not in batch
    assert any("could not be computed ahead" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="do not match"):
        _last_hidden(load_model(tiny_model), ckpt.family, batch)


def test_a_batch_state_moves_to_page_locked_host_memory():
    """The layer-wise engine's host storage (``storage host``): a batch's state pinned on the way to the host
    (pageable where no pinned memory is to be had, as here without CUDA)."""
    from reap_vlm.score.layerwise import BatchState

    state = BatchState(torch.ones(2, 3), [{"position_ids": torch.arange(3)}], {"visual_pos_masks": None}, None, 6)
    moved = state.to("cpu", pin=True)
    assert torch.equal(moved.hidden, state.hidden)
    assert torch.equal(moved.layer_kwargs[0]["position_ids"], torch.arange(3))
