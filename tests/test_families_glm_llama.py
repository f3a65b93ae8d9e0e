"""What GLM-4.5V and Llama-4 do their own way, beyond the family suite (tests/test_families.py): GLM's masked
routing masks the choice, its bias matters, its next-token-prediction layer is left out on purpose, grouped
routing is refused, its box format; Llama-4's router as the module computes it and its tiled images in
calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reap_vlm.calibration.encode import encode_sample
from reap_vlm.calibration.files import load_calibration
from reap_vlm.check.bbox import parse_bbox
from reap_vlm.checkpoint.loading import load_model, load_processor
from reap_vlm.checkpoint.reader import Checkpoint
from reap_vlm.errors import ReapError
from reap_vlm.families import GLM4V_MOE, LLAMA4, family_for_config
from reap_vlm.fixtures import glm4v_moe, llama4
from reap_vlm.fixtures.tiny import build_calibration_set
from reap_vlm.prune.rewrite import prune_checkpoint


@pytest.fixture(scope="module")
def glm(tmp_path_factory) -> Path:
    return glm4v_moe.build_checkpoint(tmp_path_factory.mktemp("glm") / "model")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return llama4.build_checkpoint(tmp_path_factory.mktemp("llama") / "model")


def _router_input(model, family, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.set_grad_enabled(False)  # restored by the autouse fixture below
    block = dict(family.moe_blocks(model))[1]
    hidden = torch.randn(256, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return block, hidden


@pytest.fixture(autouse=True)
def _grad_mode():
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


# ----------------------------------------------------------------------------------------------- GLM-4.5V


def test_glm_router_forward_is_the_modules_own(glm):
    block, x = _router_input(load_model(glm), GLM4V_MOE)
    router = GLM4V_MOE.router_of(block)
    logits, weights, ids = router(x)
    ours = GLM4V_MOE.router_forward(router, x)
    for a, b in zip((logits, weights, ids), ours):
        assert torch.equal(a, b)
    assert router.routed_scaling_factor != 1
    assert torch.allclose(weights.sum(-1), torch.full((x.shape[0],), router.routed_scaling_factor))
    # the bias decides the choice, not the weights: without it other experts are chosen for some tokens
    bias = router.e_score_correction_bias.clone()
    router.e_score_correction_bias.zero_()
    _, _, unbiased = router(x)
    router.e_score_correction_bias.copy_(bias)
    assert (ids.sort(-1).values != unbiased.sort(-1).values).any(dim=-1).float().mean() > 0.2


def test_glm_masked_routing_masks_the_choice_and_keeps_the_weights(glm):
    block, x = _router_input(load_model(glm), GLM4V_MOE)
    router = GLM4V_MOE.router_of(block)
    _, weights, ids = router(x)
    pruned = [0, 3, 5]
    bias = torch.zeros(GLM4V_MOE.num_router_rows(router))
    bias[pruned] = float("-inf")
    _, masked_weights, masked_ids = GLM4V_MOE.router_forward(router, x, logit_bias=bias)
    assert not torch.isin(masked_ids, torch.tensor(pruned)).any()  # never chosen
    untouched = ~torch.isin(ids, torch.tensor(pruned)).any(dim=-1)  # tokens that chose no pruned expert
    assert 0 < int(untouched.sum()) < x.shape[0]
    order, masked_order = ids.argsort(-1), masked_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order)[untouched], masked_ids.gather(1, masked_order)[untouched])
    # the same weights (to the last bits: the renormalising sum adds them in the order the top-k lists them)
    torch.testing.assert_close(weights.gather(1, order)[untouched],
                               masked_weights.gather(1, masked_order)[untouched], rtol=1e-6, atol=0)


def test_glm_prune_leaves_out_the_next_token_prediction_layer(glm, tmp_path):
    source = Checkpoint(glm)
    num_layers = source.config["text_config"]["num_hidden_layers"]
    mtp = [k for k in source.stored_weight_map if k.startswith(f"model.language_model.layers.{num_layers}.")]
    assert any(".eh_proj." in k for k in mtp) and any(".mlp.experts.0." in k for k in mtp)
    assert not set(mtp) & set(source.weight_map)  # neither loaded nor scored
    keep = {layer: [1, 2, 4, 6, 8, 9, 10, 11] for layer in source.moe_layers}
    record = prune_checkpoint(glm, tmp_path / "pruned", keep, verify=True, progress=False)
    pruned = Checkpoint(tmp_path / "pruned")
    assert not [k for k in pruned.stored_weight_map if k.startswith(f"model.language_model.layers.{num_layers}.")]
    text = json.loads((tmp_path / "pruned/config.json").read_text())["text_config"]
    assert text["num_nextn_predict_layers"] == 0 and text["n_routed_experts"] == 8
    assert record["tensors"]["dropped"] >= len(mtp) and record["layers_left_out"] == [num_layers]
    load_model(tmp_path / "pruned")  # no missing or unexpected key


def test_glm_grouped_routing_is_refused_before_loading():
    config = {"model_type": "glm4v_moe", "text_config": {"n_routed_experts": 128, "num_hidden_layers": 46,
                                                          "n_group": 8, "topk_group": 4}}
    with pytest.raises(ReapError, match="n_group 8"):
        family_for_config(config).moe_layers(config)


def test_glm_boxes_parse_in_its_own_format():
    for answer in ("<|begin_of_box|>[120,340,560,780]<|end_of_box|>", "The cat: <|begin_of_box|>[[120, 340, 560, "
                   "780]]<|end_of_box|>", "[120,340,560,780]"):
        box = parse_bbox(answer, GLM4V_MOE.box_format).box
        assert box is not None and box.as_list() == [120, 340, 560, 780], answer


def test_unsupported_model_type_names_the_new_families():
    with pytest.raises(ReapError, match=r"glm4v_moe.*llama4|llama4.*glm4v_moe"):
        family_for_config({"model_type": "mixtral"})


# ----------------------------------------------------------------------------------------------- Llama-4


def test_llama4_router_forward_is_the_modules_own_and_masks(llama):
    model = load_model(llama)
    assert [layer for layer, _ in LLAMA4.moe_blocks(model)] == [1, 3]  # interleaved with dense layers
    block, x = _router_input(model, LLAMA4)
    scores, logits = block.router(x)
    ours = LLAMA4.router_forward(block.router, x)
    assert torch.equal(scores, ours[0]) and torch.equal(logits, ours[1])
    weights, ids = LLAMA4.route(logits, block.router.top_k)
    assert torch.equal(weights, scores.gather(1, ids)) and (weights > 0).all()
    bias = torch.zeros(logits.shape[1])
    bias[[0, 2]] = float("-inf")
    masked, _ = LLAMA4.router_forward(block.router, x, logit_bias=bias)
    assert (masked[:, [0, 2]] == 0).all() and ((masked > 0).sum(-1) == block.router.top_k).all()
    # a zero input gives a zero output: the masked experts add nothing to the block
    zero = block.experts(torch.zeros(block.num_experts * 3, x.shape[1]))
    assert torch.equal(zero, torch.zeros_like(zero))


def test_llama4_per_expert_split_and_fuse_round_trip(llama):
    model = load_model(llama)
    experts = LLAMA4.experts_of(dict(LLAMA4.moe_blocks(model))[1])
    for name in ("gate_up_proj", "down_proj"):
        fused = getattr(experts, name).detach()
        parts = LLAMA4.split_fused(name, fused)
        assert torch.equal(LLAMA4.fuse_per_expert(name, parts), fused)
        proj = next(iter(parts[0]))
        out = torch.zeros(LLAMA4.fused_shape(name, len(parts), proj, tuple(parts[0][proj].shape)))
        for expert, tensors in enumerate(parts):
            LLAMA4.fuse_per_expert_into(name, out, expert, tensors)
        assert torch.equal(out, fused)
    # E_j(x): the expert on the unscaled input, as the module computes it for a row routed to it alone
    x = torch.randn(5, experts.hidden_size, generator=torch.Generator().manual_seed(1))
    rows = torch.zeros(experts.num_experts, *x.shape)
    rows[4] = x
    own = experts(rows.reshape(-1, x.shape[1])).reshape(experts.num_experts, *x.shape)[4]
    assert torch.allclose(LLAMA4.expert_outputs(experts, x, torch.tensor([4]))[0], own, atol=1e-6)


def test_llama4_image_sample_too_long_drops_its_tiles_whole(llama, tmp_path):
    processor = load_processor(llama)
    calib = build_calibration_set(tmp_path / "calibration") / "calibration_data.json"
    sample = next(s for s in load_calibration(calib, 100).samples if s.has_image)
    whole = encode_sample(processor, sample, 4096, family=LLAMA4)
    assert whole.pixel_values is not None and whole.image_grid_thw is None
    start = int((whole.input_ids == LLAMA4.image_start_id(processor)).nonzero()[0])
    with pytest.warns(UserWarning, match="image"):
        cut = encode_sample(processor, sample, start + 3, family=LLAMA4)
    assert cut.pixel_values is None and cut.input_ids.numel() == start


def test_quantization_lists_lose_the_experts_of_left_out_layers():
    from reap_vlm.prune.config_edit import rewrite_module_names

    names = ["lm_head", "model.language_model.layers.1.mlp.experts.3.down_proj",
             "model.language_model.layers.4.mlp.experts.3.down_proj", "model.language_model.layers.4.mlp.gate"]
    config = {"model_type": "glm4v_moe", "text_config": {"num_hidden_layers": 4}}
    assert rewrite_module_names(names, GLM4V_MOE, {1: {3: 0}}, config) == [
        "lm_head", "model.language_model.layers.1.mlp.experts.0.down_proj"]
    with pytest.raises(ReapError, match="not a MoE layer"):
        rewrite_module_names(names, GLM4V_MOE, {1: {3: 0}})
