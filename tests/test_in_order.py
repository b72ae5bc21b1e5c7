"""GPTQ in order inside a layer, in one pass (calib.in_order and its executor in calib.sequential)."""

from __future__ import annotations

import pytest
import torch
import transformers

import calib
from calib import qmath
from calib.algorithms.gptq import HessianObserver, solve
from calib.calibration import local_batches
from calib.data import CalibrationSet
from calib.errors import CalibInputError
from calib.in_order import DONE, FAILED, Aborted, Baton, one_sample, plan_stages
from calib.quantize import weight_scale
from conftest import TINYSTORIES
from test_sequential import dict_loader, nan_in_batch_2, skeleton, text_samples

LLAMA_CALLS = [("q", 1), ("k", 1), ("v", 1), ("o", 2), ("gate", 3), ("up", 3), ("down", 4)]
LLAMA_GROUPS = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


class Pair:
    def __init__(self, producer, consumers):
        self.producer, self.consumers = producer, consumers


@pytest.fixture(scope="module")
def stories_data() -> CalibrationSet:
    return text_samples(TINYSTORIES)


# --------------------------------------------------------------------------- the baton


def test_the_baton_runs_each_job_to_its_next_pause_in_turn():
    log = []

    def job(i):
        def run():
            for stage in range(2):
                log.append((i, stage))
                baton.pause(stage)
            log.append((i, "end"))
            return 10 * i
        return run

    baton = Baton([job(i) for i in range(3)])
    for stage in (0, 1, DONE):
        assert [baton.step(i) for i in range(3)] == [stage] * 3
    assert log == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, "end"), (1, "end"), (2, "end")]
    assert baton.results == [0, 10, 20]
    assert baton.current() is None


def test_a_failing_job_is_reported_and_close_unwinds_the_parked_ones():
    unwound = []

    def parked():
        try:
            baton.pause(0)
        except Aborted:
            unwound.append(True)
            raise

    def failing():
        raise ValueError("boom")

    baton = Baton([parked, failing, lambda: None])
    assert baton.step(0) == 0
    assert baton.step(1) == FAILED and isinstance(baton.errors[1], ValueError)
    baton.close()  # job 2 never started: nothing to unwind
    assert unwound == [True] and baton.where[0] == FAILED and baton.where[2] is None


# --------------------------------------------------------------------------- planning


def test_stages_follow_the_call_order():
    stages = plan_stages(LLAMA_CALLS, [["down"], ["gate", "up"], ["o"], ["q", "k", "v"]], [], True)
    assert [s.names for s in stages] == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    assert [s.first for s in stages] == ["q", "o", "gate", "down"]


@pytest.mark.parametrize("calls, pairs, rowwise, why", [
    (LLAMA_CALLS + [("down", 4)], [], True, "down is called more than once"),
    (LLAMA_CALLS[:-1], [], True, "down is not called"),
    ([(n, 5 if n == "up" else i) for n, i in LLAMA_CALLS], [], True, "gate, up do not read one tensor"),
    ([("q", 1), ("o", 2), ("k", 1), ("v", 1), ("gate", 3), ("up", 3), ("down", 4)], [], True,
     "o is called before the modules of the stage ahead of it are done"),
    (LLAMA_CALLS, [Pair("ln", ["o", "gate"])], True, "consumers o, gate are not one stage"),
    (LLAMA_CALLS, [Pair("up", ["down"])], False, "per-tensor weight scales cannot take its rescaling"),
])
def test_a_layer_that_cannot_run_in_order_says_why(calls, pairs, rowwise, why):
    result = plan_stages(calls, LLAMA_GROUPS, [(p, None) for p in pairs], rowwise)
    assert isinstance(result, str) and why in result


def test_a_producer_rounded_earlier_is_allowed_with_row_scales():
    stages = plan_stages(LLAMA_CALLS, LLAMA_GROUPS, [(Pair("ln", ["q", "k", "v"]), "a"), (Pair("up", ["down"]), "b")],
                         True)
    assert [[p.producer for p, _ in s.pairs] for s in stages] == [["ln"], [], [], ["up"]]


def test_one_sample_cuts_the_batch_dimension_only():
    hidden, mask, cache_position = torch.zeros(4, 6, 8), torch.zeros(4, 1, 6, 6), torch.arange(6)
    cos, shared = torch.zeros(4, 6, 2), torch.zeros(1, 6, 2)
    args, kwargs = one_sample((hidden,), {"attention_mask": mask, "cache_position": cache_position,
                                          "position_embeddings": (cos, shared), "flag": True}, 4)
    assert args[0].shape == (1, 6, 8) and kwargs["attention_mask"].shape == (1, 1, 6, 6)
    assert kwargs["cache_position"] is cache_position and kwargs["flag"] is True
    assert kwargs["position_embeddings"][0].shape == (1, 6, 2) and kwargs["position_embeddings"][1] is shared


# --------------------------------------------------------------------------- on a real model


def _o_proj_reference(recipe, data, qkv: dict[str, torch.Tensor] | None):
    """GPTQ for layer 0's o_proj from a plain model forward: its Hessian over every
    calibration batch, with layer 0's q/k/v weights replaced by ``qkv`` (or float)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    name = "model.layers.0.self_attn.o_proj"
    with torch.no_grad():
        for n, w in (qkv or {}).items():
            model.get_submodule(n).weight.copy_(w)
    hessian, mask = HessianObserver(), {}
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a: hessian.update(a[0], mask["now"]))
    with torch.inference_mode():
        for batch in local_batches(data, 8, 0):
            mask["now"] = batch["attention_mask"].bool()
            model(**batch, use_cache=False)
    hook.remove()
    weight = model.get_submodule(name).weight.detach()
    scale = weight_scale(weight, recipe.weights, name, {})[1]
    gptq = recipe.gptq
    return solve([name], [weight], [scale], hessian.h, recipe.weights, block_size=gptq.block_size,
                 dampening_frac=gptq.dampening_frac, actorder=gptq.actorder)[name]


def _dequantized(solved, weight_shape, args) -> torch.Tensor:
    full = qmath.expand_scale(solved.scale.float(), weight_shape, args.strategy, args.group_size)
    return solved.q.float() * full


def test_each_stage_is_solved_on_what_the_rounded_stages_before_it_give(stories_data):
    """In order, layer 0's o_proj is GPTQ on the inputs that the *rounded* q/k/v give
    (a plain forward with those weights, every batch); in two passes, on those the
    float q/k/v give. Both bit for bit."""
    recipe = calib.load_recipe("fp8-static-gptq")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    layers = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    cal = calib.calibrate(model, recipe, stories_data, batch_size=8, progress=False)
    assert cal.gptq_in_order == layers and cal.gptq_two_pass == {}
    qkv = {n: _dequantized(cal.solved[n], model.get_submodule(n).weight.shape, recipe.weights)
           for n in (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")}
    in_order = _o_proj_reference(recipe, stories_data, qkv)
    assert torch.equal(cal.solved["model.layers.0.self_attn.o_proj"].q.view(torch.uint8), in_order.q.view(torch.uint8))

    two_pass_recipe = recipe.model_copy(update={"gptq": recipe.gptq.model_copy(update={"true_sequential": False})})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    two = calib.calibrate(model, two_pass_recipe, stories_data, batch_size=8, progress=False)
    assert two.gptq_in_order == [] and set(two.gptq_two_pass) == set(layers)
    assert all(why == "gptq.true_sequential is false" for why in two.gptq_two_pass.values())
    floats = _o_proj_reference(recipe, stories_data, None)
    o_two = two.solved["model.layers.0.self_attn.o_proj"].q.view(torch.uint8)
    assert torch.equal(o_two, floats.q.view(torch.uint8))
    assert not torch.equal(o_two, in_order.q.view(torch.uint8))  # the two orders differ on this model
    # q/k/v read the layer's input in both: the same solve
    assert torch.equal(two.solved["model.layers.0.self_attn.q_proj"].q.view(torch.uint8),
                       cal.solved["model.layers.0.self_attn.q_proj"].q.view(torch.uint8))


def test_smoothquant_in_order_keeps_the_function_and_rescales_rounded_producers(stories_data):
    """int8-w8a8-gptq in order: up_proj is rounded before down_proj's ranges are
    known, then rescaled for up_proj -> down_proj; v_proj likewise for v_proj ->
    o_proj (grouped-query: each value row's scale shared by the o_proj columns of
    its query heads). The float model calib leaves behind computes what it
    computed before (the float copy took the rescaling), and the producers' stored
    scales are the per-channel scales of their rescaled weights."""
    recipe = calib.load_recipe("int8-w8a8-gptq")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    ids = stories_data.samples[0][None, :64]
    with torch.no_grad():
        before = model(ids).logits
    cal = calib.calibrate(model, recipe, stories_data, batch_size=8, progress=False)
    assert len(cal.gptq_in_order) == model.config.num_hidden_layers
    assert any(p.endswith("mlp.up_proj") for p in cal.smoothing)
    assert any(p.endswith("self_attn.v_proj") for p in cal.smoothing)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    for index in range(model.config.num_hidden_layers):
        for name in (f"model.layers.{index}.mlp.up_proj", f"model.layers.{index}.self_attn.v_proj"):
            weight = model.get_submodule(name).weight.detach()
            expected = weight_scale(weight, recipe.weights, name, {})[1]
            torch.testing.assert_close(cal.solved[name].scale, expected, rtol=1e-5, atol=0)


def test_nan_in_order_names_the_module_and_the_batch(stories_data):
    """Token 7's embedding is NaN and only the sample in batch 2 holds it: the in-order
    pass stops on the stage's Hessian with the two-pass run's message."""
    state, data = nan_in_batch_2()
    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    recipe = calib.load_recipe("fp8-static-gptq")
    with pytest.raises(CalibInputError) as err:
        calib.sequential.calibrate_sequential(skeleton(config), dict_loader(state), recipe, data, batch_size=2,
                                              progress=False)
    assert "model.layers.0.self_attn.q_proj received NaN input" in str(err.value)
    assert "calibration batch 2" in str(err.value)


def test_a_memory_budget_too_small_for_one_pass_runs_two(stories_data, tmp_path):
    """A budget the hidden states fit but not every batch's activations inside a
    layer: two passes a layer, the reason in the report."""
    from calib.sequential import calibrate_sequential, sequential_memory

    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    state = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).state_dict()
    recipe = calib.load_recipe("fp8-static-gptq")
    memory = sequential_memory(skeleton(config), stories_data, 8, recipe=recipe)
    cal = calibrate_sequential(skeleton(config), dict_loader(state), recipe, stories_data, batch_size=8,
                               budget_bytes=memory.peak(spilled=False) + 1024, spill_dir=tmp_path, progress=False)
    assert cal.gptq_in_order == [] and not cal.spilled
    assert all("exceed the memory left" in why for why in cal.gptq_two_pass.values())


def test_bert_post_layernorm_is_refused_in_order_too():
    """SmoothQuant + GPTQ in one pass: the mapping that changes BERT's function is
    refused after the layer, naming it, as in two passes (calib.algorithms.smoothquant)."""
    from calib.sequential import calibrate_sequential
    from test_smoothquant import _family_model, _ids_data, bert_post_layernorm_recipe

    recipe = bert_post_layernorm_recipe("int8-w8a8-gptq")
    with pytest.raises(CalibInputError, match=r"SmoothQuant would change the model: after rescaling .*"
                                              r"encoder\.layer\.0\.attention\.output\.LayerNorm -> "
                                              r"encoder\.layer\.0\.intermediate\.dense"):
        calibrate_sequential(_family_model("bert"), lambda names: {}, recipe, _ids_data(), batch_size=4,
                             progress=False)
