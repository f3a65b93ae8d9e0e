"""The family exactness suite: every family in ``reap_vlm.fixtures.families.FIXTURES`` passes the same proofs.

* REAP (full, routed, router modes; whole-model and layer-wise engines; batches > 1 with padding) equals an
  independent float64 brute force: one sample at a time, no padding, the MoE block's input captured by a hook
  on the block, routing and expert outputs from the model's own router and experts modules in float64;
* the pruned checkpoint (from the release layout and from the fused one) gives the original's logits with the
  pruned experts' routing masked, through reap_vlm's loader and through transformers' Auto class (no missing,
  unexpected or mismatched keys);
* quantized releases (where the family has them) prune to the pruned dequantized reference.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from reap_vlm.calibration.encode import collate, encode_sample, to_model
from reap_vlm.calibration.files import load_calibration
from reap_vlm.check.masked_routing import masked_routing
from reap_vlm.checkpoint.loading import check_loading_info, load_model, load_processor, tokenizer_of
from reap_vlm.checkpoint.reader import Checkpoint, forward_weights
from reap_vlm.errors import ReapError
from reap_vlm.fixtures.families import FIXTURES, FamilyFixture
from reap_vlm.fixtures.quantized import quantize_checkpoint
from reap_vlm.fixtures.tiny import build_calibration_set
from reap_vlm.prune.rewrite import prune_checkpoint
from reap_vlm.score.job import run_reap
from reap_vlm.settings import Settings

NAMES = sorted(FIXTURES)
# text-only families, one fixture each (variants left out)
TEXT_ONLY = [name for name in NAMES
             if not FIXTURES[name].family.has_vision and name in FIXTURES[name].family.model_types]
QUANTIZED = [(name, fmt) for name in NAMES for fmt in FIXTURES[name].quantized]  # the formats each has releases in
RTOL = 1e-5


@pytest.fixture(scope="module", params=NAMES)
def case(request, tmp_path_factory) -> tuple[str, FamilyFixture, Path, Path]:
    """(name, fixture, checkpoint in the release layout, calibration file)."""
    name = request.param
    fixture = FIXTURES[name]
    root = tmp_path_factory.mktemp(f"family-{name}")
    return name, fixture, fixture.build(root / "release"), fixture.calibration(root / "calibration")


# ----------------------------------------------------------------------------------------------- brute force


def brute_force(fixture: FamilyFixture, model_path: Path, calib_file: Path) -> dict:
    """Every metric from first principles, in float64."""
    model = load_model(model_path)
    processor = load_processor(model_path)
    family = fixture.family
    blocks = dict(family.moe_blocks(model))
    assert tuple(sorted(blocks)) == fixture.moe_layers
    layers = list(fixture.moe_layers)
    captured: dict[int, torch.Tensor] = {}
    hooks = [blocks[i].register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach()))
             for i in layers]
    experts64 = {i: _float64(blocks[i], family) for i in layers}
    num = Checkpoint(model_path).num_experts
    visual = {getattr(model.config, k, None) for k in ("image_token_id", "video_token_id")} - {None}
    names = ("count", "g", "gn", "n", "p", "pn", "count_img", "gn_img", "count_txt", "gn_txt", "peak_img", "peak_txt")
    sums = {name: np.zeros((len(layers), num)) for name in names}
    n_tokens = n_image = 0
    lengths = []
    with torch.no_grad():
        for sample in load_calibration(calib_file, 100).samples:
            enc = encode_sample(processor, sample, 2048, family=family)
            inputs = {"input_ids": enc.input_ids[None], "attention_mask": torch.ones_like(enc.input_ids)[None]}
            if enc.pixel_values is not None:  # in the model's dtype (Llama-4's processor gives bfloat16)
                inputs["pixel_values"] = enc.pixel_values.to(model.dtype)
            if enc.image_grid_thw is not None:
                inputs["image_grid_thw"] = enc.image_grid_thw
            if enc.mm_token_type_ids is not None:
                inputs["mm_token_type_ids"] = enc.mm_token_type_ids[None]
            model(**inputs)
            is_image = np.isin(enc.input_ids.numpy(), list(visual))
            n_tokens += enc.input_ids.numel()
            n_image += int(is_image.sum())
            lengths.append(enc.input_ids.numel())
            for li, layer in enumerate(layers):
                x = captured[layer].reshape(-1, captured[layer].shape[-1]).double()  # [S, H]
                logits, gates, ids = fixture.router(experts64[layer], x)
                probs = torch.softmax(logits, dim=-1)
                outs = torch.stack([fixture.expert(experts64[layer], j, x) for j in range(num)], dim=1)  # [S, E, H]
                norms, peaks = outs.norm(dim=-1), outs.abs().amax(dim=-1)
                routed = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, ids, True)  # [S, E]
                g = torch.zeros_like(norms).scatter_(1, ids, gates.double())  # the applied gate where routed
                add = {"p": probs, "pn": probs * norms, "count": routed, "g": g, "gn": g * norms,
                       "n": routed * norms}
                image = torch.from_numpy(is_image)[:, None]
                for tag, rows in (("img", image), ("txt", ~image)):
                    add[f"count_{tag}"], add[f"gn_{tag}"] = routed & rows, g * norms * rows
                    seen = (peaks * (routed & rows)).amax(dim=0).numpy()
                    sums[f"peak_{tag}"][li] = np.maximum(sums[f"peak_{tag}"][li], seen)
                for key, value in add.items():
                    sums[key][li] += value.double().sum(dim=0).numpy()
    for h in hooks:
        h.remove()

    def div(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    reap_image, reap_text = div(sums["gn_img"], sums["count_img"]), div(sums["gn_txt"], sums["count_txt"])
    shares = [div(m, m.sum(axis=1, keepdims=True)) for m in (reap_image, reap_text) if m.sum() > 0]
    return {
        "reap": div(sums["gn"], sums["count"]), "ean": div(sums["n"], sums["count"]), "frequency": sums["count"],
        "weighted_frequency": sums["g"], "soft_frequency": sums["p"], "reap_dense": sums["pn"] / n_tokens,
        "reap_image": reap_image, "reap_text": reap_text,
        "frequency_image": sums["count_img"], "frequency_text": sums["count_txt"],
        "reap_balanced": np.maximum.reduce(shares),
        "max_activation": np.maximum(sums["peak_img"], sums["peak_txt"]),
        "max_activation_image": sums["peak_img"], "max_activation_text": sums["peak_txt"],
        "n_tokens": n_tokens, "n_image": n_image, "lengths": lengths,
    }


def _float64(block, family):
    """A float64 copy of a MoE block whose experts run transformers' eager loop (the grouped kernels take no
    float64)."""
    block = copy.deepcopy(block).double()
    config = getattr(family.experts_of(block), "config", None)
    if config is not None:
        config._experts_implementation = "eager"
    return block


@pytest.fixture(scope="module")
def reference(case):
    _, fixture, model, calib = case
    return brute_force(fixture, model, calib)


RUNS = [("full", "model", 3), ("full", "layerwise", 3), ("routed", "model", 4), ("routed", "layerwise", 4),
        ("router", "model", 2)]


@pytest.mark.parametrize("mode,engine,batch_size", RUNS)
def test_reap_equals_the_float64_brute_force(case, reference, tmp_path, mode, engine, batch_size):
    _, fixture, model, calib = case
    assert len(set(reference["lengths"][:batch_size])) > 1, "the first batch must carry padding"
    settings = Settings(model_path=model, calibration_path=calib, output_path=tmp_path, device="cpu",
                        dtype="float32", prune_ratio=0.25, max_samples=100, resume=False, scoring_mode=mode,
                        engine=engine, batch_size=batch_size, criterion="frequency" if mode == "router" else "reap")
    meta = run_reap(settings)
    assert meta["run"]["engine"] == engine and meta["moe_layers"] == list(fixture.moe_layers)
    assert meta["num_tokens"]["total"] == reference["n_tokens"]
    assert meta["num_tokens"]["image"] == reference["n_image"]
    assert (reference["n_image"] > 0) == fixture.family.has_vision
    assert reference["frequency"].sum() > 0
    for name, values in meta["metrics"].items():
        np.testing.assert_allclose(np.array(values), reference[name], rtol=RTOL, atol=1e-9, err_msg=name)
    assert ("reap_dense" in meta["metrics"]) == (mode == "full")
    if mode == "router":  # the router's statistics only
        assert set(meta["metrics"]) == {"frequency", "weighted_frequency", "soft_frequency", "frequency_image",
                                        "frequency_text"}
    assert fixture.family.routing_description in meta["methodology"]
    reap = reference["reap"]
    assert all(len(np.unique(np.round(row, 6))) == row.size for row in reap), "scores must separate the experts"


# ----------------------------------------------------------------------------------------------- pruning


def _keep(fixture: FamilyFixture, num_experts: int, count: int) -> dict[int, list[int]]:
    return {layer: sorted(random.Random(layer).sample(range(num_experts), count)) for layer in fixture.moe_layers}


def _prompt_batch(model_path: Path, calib: Path, family) -> dict[str, torch.Tensor]:
    """Two calibration prompts of different lengths (one with an image where the family takes images), padded."""
    processor = load_processor(model_path)
    samples = load_calibration(calib, 100).samples
    picked = [next(s for s in samples if s.has_image) if family.has_vision else samples[0], samples[-1]]
    encoded = [encode_sample(processor, s, 2048, family=family) for s in picked]
    assert encoded[0].input_ids.numel() != encoded[1].input_ids.numel()
    return to_model(collate(encoded, tokenizer_of(processor).pad_token_id), "cpu", torch.float32)


def _config_diff(before: dict, after: dict, path: str = "") -> dict:
    """{dotted path: new value} of every leaf that differs."""
    out = {}
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_config_diff(a, b, f"{path}{key}."))
        elif a != b:
            out[f"{path}{key}"] = b
    return out


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


@pytest.fixture(scope="module")
def masked_reference(case):
    """What every pruned model must reproduce: the original's logits with routing masked to KEEP, and unmasked."""
    _, fixture, model_path, calib = case
    original = load_model(model_path)
    keep = _keep(fixture, Checkpoint(model_path).num_experts, 7)
    batch = _prompt_batch(model_path, calib, fixture.family)
    unmasked = _logits(original, batch)
    with masked_routing(original, fixture.family, keep):
        masked = _logits(original, batch)
    return keep, batch, masked, unmasked


@pytest.mark.parametrize("layout", ["release", "fused", "per_expert"])
def test_pruned_model_equals_the_masked_original(case, masked_reference, tmp_path, layout):
    _, fixture, release, _ = case
    keep, batch, masked, unmasked = masked_reference
    source = release if layout == "release" else fixture.build(tmp_path / "source", per_expert=layout == "per_expert")
    pruned = tmp_path / "pruned"
    prune_checkpoint(source, pruned, keep, verify=True, progress=False)
    assert Checkpoint(pruned).num_experts == 7
    assert Checkpoint(pruned).has_per_expert_keys == Checkpoint(source).has_per_expert_keys
    assert _config_diff(Checkpoint(source).config, Checkpoint(pruned).config) == dict(fixture.config_changes)
    for prefix in fixture.dropped:
        assert any(k.startswith(prefix) for k in Checkpoint(source).stored_weight_map)
        assert not any(k.startswith(prefix) for k in Checkpoint(pruned).stored_weight_map)
    got = _logits(load_model(pruned), batch)
    assert torch.allclose(got, masked, atol=1e-5, rtol=0)
    assert not torch.allclose(got, unmasked, atol=1e-3), "pruning changed nothing"
    on_disk = "per_expert" if Checkpoint(pruned).has_per_expert_keys else "fused"
    if on_disk in fixture.transformers_layouts:
        auto = fixture.family.auto_model()
        model, info = auto.from_pretrained(str(pruned), dtype=torch.float32, output_loading_info=True)
        check_loading_info(pruned, info)  # no missing, unexpected or mismatched key
        assert torch.allclose(_logits(model.eval(), batch), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,fmt", QUANTIZED)
def test_pruned_quantized_release_equals_the_masked_dequantized_original(name, fmt, tmp_path):
    fixture = FIXTURES[name]
    calib = fixture.calibration(tmp_path / "calibration")
    source = fixture.build(tmp_path / "source", per_expert=True)
    quantized, reference = quantize_checkpoint(source, tmp_path / "q", fmt, tmp_path / "q-ref")
    assert Checkpoint(quantized).quant_format.name == fmt
    keep = _keep(fixture, Checkpoint(source).num_experts, 7)
    batch = _prompt_batch(source, calib, fixture.family)
    original = load_model(reference)
    with masked_routing(original, fixture.family, keep):
        masked = _logits(original, batch)
    prune_checkpoint(quantized, tmp_path / "pruned", keep, verify=True, progress=False)
    assert Checkpoint(tmp_path / "pruned").quant_format.name == fmt
    assert torch.allclose(_logits(load_model(tmp_path / "pruned"), batch), masked, atol=1e-5, rtol=0)


def test_forward_weights_are_the_loaded_models_by_part(case):
    """torchrun's shares are balanced by a forward's cost (``forward_weights``, read from the safetensors headers):
    the decoder layers' weights but the routed experts', the routed experts' (all), the vision tower's run on every
    patch and those run once per image token (the embeddings, looked up, left out), as the loaded model holds
    them."""
    _, fixture, path, _ = case
    ckpt, family = Checkpoint(path), fixture.family
    model = load_model(path)
    module_names = {id(module): name for name, module in model.named_modules()}
    routed_names = {f"{module_names[id(experts)]}.{key}" for experts in (family.experts_of(b) for _, b in
                                                                        family.moe_blocks(model))
                    for key in experts.state_dict()}
    embeddings = family.embedding_key.rsplit(".", 1)[0] + "."
    dense = routed = patch = token = 0
    for name, tensor in model.state_dict().items():  # parameters and stored buffers (a router's score bias)
        if family.layer_of_key(name) is not None:
            routed += tensor.numel() if name in routed_names else 0
            dense += 0 if name in routed_names else tensor.numel()
        elif name.startswith(family.prelayer_prefixes()) and not name.startswith(embeddings):
            patch += tensor.numel() if name.startswith(family.vision_per_patch) else 0
            token += 0 if name.startswith(family.vision_per_patch) else tensor.numel()
    assert routed and dense and (patch > 0) == (token > 0) == family.has_vision
    assert forward_weights(ckpt) == (dense, routed, patch, token)


@pytest.mark.parametrize("name,fmt", QUANTIZED)
def test_a_quantized_release_weighs_about_its_dequantized_reference(name, fmt, tmp_path):
    """Packed integer tensors count every weight they hold (a 4-bit AWQ int32 eight); the scales and zero points
    count too, a few percent at these tiny models' groups of 16."""
    fixture = FIXTURES[name]
    source = fixture.build(tmp_path / "source", per_expert=True)
    quantized, reference = quantize_checkpoint(source, tmp_path / "q", fmt, tmp_path / "q-ref")
    got, want = forward_weights(Checkpoint(quantized)), forward_weights(Checkpoint(reference))
    for part, (g, w) in zip(got._fields, zip(got, want)):
        assert w <= g <= 1.15 * w, part


@pytest.mark.parametrize("name", TEXT_ONLY)
def test_a_text_only_family_refuses_images_before_loading(name, tmp_path, monkeypatch):
    import reap_vlm.score.job as score_job

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(score_job, "load_processor", refuse)
    model = FIXTURES[name].build(tmp_path / "model")
    calib = build_calibration_set(tmp_path / "calibration") / "calibration_data.json"
    settings = Settings(model_path=model, calibration_path=calib, output_path=tmp_path / "out", device="cpu",
                        dtype="float32", resume=False)
    with pytest.raises(ReapError, match=r"item\(s\) 0, 1, 2, 3, 4 and 1 more carry images, but .* is a text-only"):
        run_reap(settings)


@pytest.mark.parametrize("name", TEXT_ONLY)
def test_a_text_only_family_is_checked_on_text_prompts(name, tmp_path):
    """test_pruned_model on a pruned text-only model: built-in prompts are text only, surgery is exact."""
    from reap_vlm.check.job import run_test

    fixture = FIXTURES[name]
    model = fixture.build(tmp_path / "model")
    keep = _keep(fixture, Checkpoint(model).num_experts, 7)
    prune_checkpoint(model, tmp_path / "pruned", keep, verify=True, progress=False)
    settings = Settings(model_path=model, pruned_output_path=tmp_path / "pruned", test_output_path=tmp_path / "report",
                        device="cpu", dtype="float32", num_prompts=4, max_new_tokens=4)
    outcome = run_test(settings)
    assert outcome.passed, outcome.verdict
    assert [row["kind"] for row in outcome.report["prompts"]] == ["text"] * 4


def test_an_unsupported_model_type_names_every_supported_family():
    from reap_vlm.families import family_for_config

    with pytest.raises(ReapError) as err:
        family_for_config({"model_type": "mixtral"})
    for fixture in FIXTURES.values():
        assert fixture.family.model_types[0] in str(err.value) and fixture.family.name in str(err.value)


def test_bench_families_runs_tiny_on_the_cpu(tmp_path, monkeypatch):
    """bench/bench_families.py --tiny: every family's layer timed, the observed forward bitwise the plain one."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import bench_families as bench

    results = bench.main(["--tiny", "--out", str(tmp_path), "--tokens", "64", "--reps", "1"])
    assert [r["family"] for r in results] == list(bench.FAMILY_SHAPES)
    for r in results:
        assert r["routed_bitwise"] and r["full_bitwise"] and r["routed_counted_every_token"], r
    assert "| qwen3_moe | Qwen3-30B-A3B |" in (tmp_path / "RESULTS_families.md").read_text()


def test_a_dropped_part_leaves_the_quantization_lists_and_the_layers_are_renumbered():
    """Qwen3.5-MoE's FP8 releases name mtp.* modules in modules_to_not_convert: the pruned config names none of
    them (the part is gone), while a decoder layer's expert names are renumbered as for any family."""
    from reap_vlm.families import QWEN3_5_MOE
    from reap_vlm.prune.config_edit import rewrite_module_names

    layer = "model.language_model.layers.1.mlp.experts"
    names = ["lm_head", "mtp.fc", "mtp.layers.0.mlp.gate", "mtp.layers.0.mlp.experts.3.gate_proj",
             f"{layer}.4.up_proj", f"{layer}.5.up_proj"]
    assert rewrite_module_names(names, QWEN3_5_MOE, {1: {5: 0, 9: 1}}) == ["lm_head", f"{layer}.0.up_proj"]
