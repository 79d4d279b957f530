"""edgequant.layerwise: the Hessians GPTQ reads."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from edgequant import layerwise


def _sums(batches, cols, readers):
    shared: dict = {}
    hessians = [layerwise._Hessian(cols, shared) for _ in range(readers)]
    for x in batches:
        for h in hessians:  # the linears reading one input see the same tensor, in turn
            h(None, (x,), None)
    return hessians


def test_hessian_sums_are_the_same_made_whole_or_by_row_blocks(monkeypatch):
    torch.manual_seed(0)
    cols = 2100  # blocks of 499 rows, the last of 104
    batches = [torch.randn(1, 256, cols) * torch.rand(cols) * 4 for _ in range(3)]
    whole = _sums(batches, cols, readers=3)
    monkeypatch.setattr(layerwise, "SHARED_PRODUCT", 0)  # every product by row blocks
    blocks = _sums(batches, cols, readers=3)
    x = torch.cat(batches, 1)[0].double()
    for a, b in zip(whole, blocks, strict=True):
        assert torch.equal(a.sum, b.sum) and a.rows == b.rows == 768
        assert torch.allclose(a.sum, x.T @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(whole[0].sum, whole[2].sum)
    expected = 2.0 * whole[1].sum / 768
    assert torch.equal(whole[1].take(), expected) and whole[1].sum is None


def _gemma3_with_local_and_global_layers():
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=4, vocab_size=128, max_position_embeddings=64,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )  # fmt: skip
    return transformers.Gemma3ForCausalLM(config).eval()


@torch.no_grad()
def test_every_layer_runs_with_the_mask_and_rope_the_model_gives_it():
    # Gemma 3's sliding-window layers get another mask and RoPE table than its global ones:
    # calibration runs each layer with its own (all with layer 0's gave other hidden states)
    model = _gemma3_with_local_and_global_layers()
    batches = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(k))
               for k in range(2)]  # fmt: skip
    outputs = []
    last = model.model.layers[-1]
    handle = last.register_forward_hook(lambda m, a, out: outputs.append(out))
    for ids in batches:
        model(ids, use_cache=False)
    handle.remove()
    steps = layerwise.LayerByLayer(model, {}, batches)
    for i in range(len(steps.layers)):
        steps.step(i)
    for got, want in zip(steps.hidden(), outputs, strict=True):
        assert torch.equal(got, want)
    assert "forward" not in vars(model.model.layers[0])  # the recording forward is gone


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_sequential_gptq_rounds_each_stage_on_what_the_rounded_stages_before_it_give(
    monkeypatch,
):
    batches = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(k))
               for k in range(3)]  # fmt: skip
    taken: dict[str, dict[str, torch.Tensor]] = {}
    original = layerwise._gptq

    def recording(module, scheme, h, write=True, shift=None, gap=None):
        taken[mode][module.edgequant_name] = h.value().clone()
        return original(module, scheme, h, write, shift, gap)

    monkeypatch.setattr(layerwise, "_gptq", recording)
    runs: Counter = Counter()
    for mode in ("together", "sequential"):
        model = _tiny_llama()
        layer = model.model.layers[0]
        names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        for n in names:
            layer.get_submodule(n).edgequant_name = n
        scheme = _gptq_int4(sequential=mode == "sequential")
        schemes = {f"model.layers.0.{n}": scheme for n in names}
        taken[mode] = {}
        steps = layerwise.LayerByLayer(model, schemes, batches)
        if mode == "sequential":
            assert layerwise._stages(layer, steps.inputs, {n: layer.get_submodule(n)
                                                           for n in names}) == [
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
            ]  # fmt: skip
        runs.clear()
        counting = [layer.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: runs.update([n])
        ) for n in names]  # fmt: skip
        steps.step(0)
        for h in counting:
            h.remove()
        # each linear runs in the gathering pass and the pass giving the next layer's inputs;
        # by stages, in the run finding the stages (one batch), then in every later stage's
        # passes, which stop where their own stage begins, and the last pass
        want = {"together": [6] * 7, "sequential": [1 + 3 * 4] * 3 + [1 + 3 * 3] + [1 + 3 * 2] * 2
                + [1 + 3]}[mode]  # fmt: skip
        assert [runs[n] for n in names] == want, runs
        # o_proj's inputs now, with q/k/v rounded (the model's layer 0 holds its rounded weights)
        seen: list[torch.Tensor] = []
        handle = layer.self_attn.o_proj.register_forward_hook(
            lambda m, a, out, seen=seen: seen.append(a[0].reshape(-1, a[0].shape[-1]).double())
        )
        for ids in batches:
            model(ids, use_cache=False)
        handle.remove()
        x = torch.cat(seen)
        rounded_inputs = 2.0 * x.T @ x / x.shape[0]
        close = torch.allclose(taken[mode]["self_attn.o_proj"], rounded_inputs, rtol=1e-4,
                               atol=1e-6)  # fmt: skip
        assert close == (mode == "sequential")
    # q/k/v read the layer's input either way: the same Hessian
    assert torch.equal(
        taken["together"]["self_attn.q_proj"], taken["sequential"]["self_attn.q_proj"]
    )


def _layer_linears(model) -> list[str]:
    """The names of the decoder layers' linears."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]  # fmt: skip


def _gptq_int4(**params):
    """int4 in groups of 16 rounded by GPTQ with ``params``."""
    from edgequant.schemes import Scheme

    return Scheme("int4", granularity="per_group", group_size=16, algorithm="gptq",
                  algorithm_params=params)  # fmt: skip


def _batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(k))
            for k in range(n)]  # fmt: skip


def _inputs_of(model, fqns: list[str], batches) -> dict[str, torch.Tensor]:
    """fqn -> every input row ``[n, cols]`` (float64) the linears ``fqns`` read in ``model``."""
    seen: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}
    handles = [model.get_submodule(f).register_forward_hook(
        lambda m, a, out, f=f: seen[f].append(a[0].reshape(-1, a[0].shape[-1]).double())
    ) for f in fqns]  # fmt: skip
    for ids in batches:
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {f: torch.cat(rows) for f, rows in seen.items()}


@torch.no_grad()
def test_calibration_rounds_the_inputs_of_int8_dynamic_linears_as_their_kernels_do(monkeypatch):
    from edgequant.kernels.reference import fake_quantize_tokens

    taken: dict[str, torch.Tensor] = {}
    original = layerwise._gptq

    def recording(module, scheme, h, write=True, shift=None, gap=None):
        taken[module.edgequant_name] = h.value().clone()
        return original(module, scheme, h, write, shift, gap)

    monkeypatch.setattr(layerwise, "_gptq", recording)
    model, batches = _tiny_llama(), _batches()
    layer = model.model.layers[0]
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    for n in names:
        layer.get_submodule(n).edgequant_name = n
    scheme = dataclasses.replace(_gptq_int4(sequential=True), activation="int8_dynamic")
    steps = layerwise.LayerByLayer(model, {f"model.layers.0.{n}": scheme for n in names},
                                   batches)  # fmt: skip
    steps.step(0)
    assert not any(layer.get_submodule(n)._forward_pre_hooks for n in names)  # taken off
    # layer 0 holds its rounded weights: run it as deployed, each linear's input rounded per
    # token (asymmetric int8) first
    for n in names:
        layer.get_submodule(n).register_forward_pre_hook(
            lambda m, a: (fake_quantize_tokens(a[0], symmetric=False), *a[1:])
        )
    outputs: list[torch.Tensor] = []
    layer.register_forward_hook(lambda m, a, out: outputs.append(layerwise._hidden(out)))
    inputs = _inputs_of(model, [f"model.layers.0.{n}" for n in names], batches)
    for n in names:  # every stage's Hessian is of the rounded inputs the rounded stages give
        x = inputs[f"model.layers.0.{n}"]
        torch.testing.assert_close(taken[n], 2.0 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    # and the next layer's inputs are what the layer gives so (the weight-only rules' inputs
    # stay as they are: test_sequential_gptq_rounds_each_stage_on_what_the_rounded_stages...)
    for got, want in zip(steps.hidden(), outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_float_hessians_are_those_of_the_float_models_own_pass():
    # one pass of each float layer gathers its Hessians and gives the next layer its inputs
    model = _tiny_llama()
    batches = _batches()
    fqns = [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]  # fmt: skip
    seen = _inputs_of(model, fqns, batches)
    got: dict[str, torch.Tensor] = {}
    for layer in layerwise.float_hessians(model, fqns, batches):
        got.update(layer)
    assert sorted(got) == sorted(fqns)
    for f in fqns:
        x = seen[f]
        assert torch.allclose(got[f], 2.0 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6), f


@torch.no_grad()
def test_an_untied_head_is_rounded_from_the_last_layers_hidden_states(monkeypatch):
    # what a whole-model pass would give it, without that pass
    from edgequant.schemes import Scheme

    scheme = Scheme("int4", granularity="per_group", group_size=16, algorithm="gptq")
    found = {}
    for way in ("hidden states", "whole pass"):
        model = _tiny_llama()
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        schemes = {n: scheme for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert "lm_head" in schemes
        if way == "hidden states":

            def refuse(*args):
                raise AssertionError("the whole model ran again")

            monkeypatch.setattr(layerwise, "_outside_layers", refuse)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(layerwise, "head_norm", lambda model, fqns: None)
        found[way] = layerwise.run(model, schemes, _batches())["lm_head"]
    a, b = found["hidden states"], found["whole pass"]
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)


@torch.no_grad()
def test_gptaq_head_fits_a_float_head_to_the_rounded_models_final_hidden_states():
    from edgequant.algorithms import gptaq_target

    float_model, model, batches = _tiny_llama(), _tiny_llama(), _batches()
    original = model.lm_head.weight.detach().clone()
    schemes = {n: _gptq_int4(gptaq=0.25, gptaq_head=1.0) for n in _layer_linears(model)}
    layerwise.run(model, schemes, batches)

    # the rounded model's head inputs (its layers hold their dequantized weights), the float's
    xq = _inputs_of(model, ["lm_head"], batches)["lm_head"]
    xf = _inputs_of(float_model, ["lm_head"], batches)["lm_head"]
    n = xq.shape[0]
    want = gptaq_target(original, 2.0 * xq.T @ xq / n, 2.0 * (xf - xq).T @ xq / n, 1.0)
    fitted = model.lm_head.weight
    torch.testing.assert_close(fitted, want, rtol=1e-4, atol=1e-5)

    def error(w: torch.Tensor) -> float:  # against the float logits, on the calibration rows
        return float(((xq @ w.double().T - xf @ original.double().T) ** 2).sum())

    assert error(fitted) < 0.2 * error(original)  # measured: 0.05 x (72 rows of 64 values)
    # a tied head would change the embedding's lookups too
    model = _tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError) as e:
        layerwise.run(model, schemes, batches)
    assert str(e.value) == (
        "gptaq_head: lm_head is tied to the embedding, whose lookups would change too; untie "
        "the head (a rotation unties it where the final norm has a weight) or drop gptaq_head"
    )
    # a head rounded by its own rule (and its own gptaq) is not fitted besides
    model = _tiny_llama()
    rounded = layerwise.run(model, {**schemes, "lm_head": _gptq_int4(gptaq=0.25)}, batches)
    assert torch.equal(model.lm_head.weight, original) and "lm_head" in rounded


def test_float_hessians_refuse_a_linear_outside_the_layers_that_is_not_the_head():
    model = _tiny_llama()
    with pytest.raises(ValueError) as e:
        next(layerwise.float_hessians(model, ["model.embed_tokens"], _batches()))
    assert str(e.value) == (
        "float_hessians: ['model.embed_tokens'] are outside the decoder layers and are not the "
        "model's head (the linear reading its final norm)"
    )


@torch.no_grad()
@pytest.mark.parametrize("sequential", [False, True])
def test_gptaq_rounds_toward_the_float_models_outputs(monkeypatch, sequential):
    # each linear's shift (X_f - X_q)^T X_q pairs what it reads in the float model with what it
    # reads in the model being rounded (the layers before it rounded; with `sequential` the
    # stages before it in its own layer too), the untied head's as well
    import copy

    from edgequant import algorithms

    batches = _batches()
    float_model = _tiny_llama()
    float_model.lm_head.weight = torch.nn.Parameter(float_model.lm_head.weight.detach().clone())
    linears = [n for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear)]
    found: dict[float, dict] = {}
    shifts: dict[str, torch.Tensor] = {}
    original = algorithms.gptaq_target

    def recording(weight, hessian, shift, alpha, damp=0.01, **gap):
        shifts[names[id(weight)]] = shift.clone()
        return original(weight, hessian, shift, alpha, damp, **gap)

    monkeypatch.setattr(algorithms, "gptaq_target", recording)
    for alpha in (0.0, 0.25):
        model = copy.deepcopy(float_model)
        names = {id(model.get_submodule(f).weight): f for f in linears}
        scheme = _gptq_int4(gptaq=alpha, sequential=sequential)
        found[alpha] = layerwise.run(model, {f: scheme for f in linears}, batches)
    assert sorted(shifts) == sorted(linears)  # alpha 0: plain GPTQ, no shift gathered
    # the first linears read the same inputs in both models: no shift, plain GPTQ's rounding
    for f in [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]:
        assert torch.count_nonzero(shifts[f]) == 0, f
        assert torch.equal(found[0.25][f].q, found[0.0][f].q), f

    def round_in(model, fqns):
        for f in fqns:
            weight = found[0.25][f].dequantize(16).to(torch.float32)
            model.get_submodule(f).weight = torch.nn.Parameter(weight)

    # every other one against the rounded model's inputs, rebuilt here stage by stage
    rounded = copy.deepcopy(float_model)
    stages = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]  # fmt: skip
    fx = _inputs_of(float_model, linears, batches)
    for i in range(2):
        for stage in stages:
            here = [f"model.layers.{i}.{n}" for n in stage]
            xq = _inputs_of(rounded, here, batches)
            for f in here:
                want = 2.0 * (fx[f] - xq[f]).T @ xq[f] / xq[f].shape[0]
                assert torch.allclose(shifts[f], want, rtol=1e-4, atol=1e-6), f
            if sequential:  # the next stages read this one rounded
                round_in(rounded, here)
        round_in(rounded, [f for f in linears if f.startswith(f"model.layers.{i}.")])
        # nothing before the first layer's down projection is rounded unless by stages
        moved = torch.count_nonzero(shifts[f"model.layers.{i}.mlp.down_proj"]) > 0
        assert moved == (i > 0 or sequential)
    xq = _inputs_of(rounded, ["lm_head"], batches)["lm_head"]
    want = 2.0 * (fx["lm_head"] - xq).T @ xq / xq.shape[0]
    assert torch.allclose(shifts["lm_head"], want, rtol=1e-4, atol=1e-6)
    # and the rounding changes where the shift is not zero
    assert not torch.equal(found[0.25]["lm_head"].q, found[0.0]["lm_head"].q)


@torch.no_grad()
def test_gptaq_by_stages_runs_the_float_twin_once_when_its_inputs_fit(monkeypatch):
    # the twin's inputs kept for every batch (one twin pass a layer) or, past TWIN_ROWS_BYTES,
    # the twin run again for each stage: the same rounding bit for bit (the residual stream's
    # gap too, kept or from the twin's last run)
    import copy

    batches = _batches()
    float_model = _tiny_llama()
    linears = _layer_linears(float_model)
    scheme = _gptq_int4(gptaq=0.25, sequential=True, gptaq_residual=0.5)
    kept: list[int] = []
    original = layerwise._twin_rows

    def counting(twin, floats, names, writer=None):
        kept.append(len(names))
        return original(twin, floats, names, writer)

    monkeypatch.setattr(layerwise, "_twin_rows", counting)
    # the next layer's inputs made from the last run (tested on its own below) in neither
    monkeypatch.setattr(layerwise, "_rest_fits", lambda inputs, linear: False)
    # what is kept: each stage's one input (64 wide but the down projection's 96), 72 rows
    layer = float_model.model.layers[0]
    stages = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]  # fmt: skip
    floats = [((torch.zeros(1, 24, 64),), {}) for _ in batches]
    modules = {n: layer.get_submodule(n) for stage in stages for n in stage}
    assert layerwise._twin_rows_bytes(floats, modules, stages) == 4 * 72 * (3 * 64 + 96)
    found = {}
    roomy = layerwise.TWIN_ROWS_BYTES
    for limit in (roomy, 0):
        monkeypatch.setattr(layerwise, "TWIN_ROWS_BYTES", limit)
        found[limit] = layerwise.run(copy.deepcopy(float_model), {f: scheme for f in linears},
                                     batches)  # fmt: skip
    assert kept == [7, 7]  # once a layer with the room, never without it
    for f in linears:
        a, b = found[roomy][f], found[0][f]
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale), f


@torch.no_grad()
@pytest.mark.parametrize("sequential", [False, True])
def test_gptaq_residual_moves_the_down_projection_toward_the_float_models_stream(
    monkeypatch, sequential
):
    # the gap of each layer's down projection pairs what the stream holds just before it is
    # added (the input of the post-attention norm) in the float model and in the model being
    # rounded (the layers before rounded; by stages, its own layer's other linears too) with
    # what it reads in the latter
    import copy

    from edgequant import algorithms

    batches = _batches()
    float_model = _tiny_llama()
    linears = _layer_linears(float_model)
    gaps: dict[str, torch.Tensor] = {}
    original = algorithms.gptaq_target

    def recording(weight, hessian, shift, alpha, damp=0.01, gap=None, beta=0.0):
        if gap is not None:
            gaps[names[id(weight)]] = gap.clone()
            assert beta == 0.5
        return original(weight, hessian, shift, alpha, damp, gap, beta)

    monkeypatch.setattr(algorithms, "gptaq_target", recording)
    model = copy.deepcopy(float_model)
    names = {id(model.get_submodule(f).weight): f for f in linears}
    scheme = _gptq_int4(gptaq=0.25, gptaq_residual=0.5, sequential=sequential)
    found = layerwise.run(model, {f: scheme for f in linears}, batches)
    assert sorted(gaps) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    rounded = copy.deepcopy(float_model)
    norms = [f"model.layers.{i}.post_attention_layernorm" for i in range(2)]
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    stream_f = _inputs_of(float_model, norms, batches)

    def round_in(fqns):
        for f in fqns:
            weight = found[f].dequantize(16).to(torch.float32)
            rounded.get_submodule(f).weight = torch.nn.Parameter(weight)

    for i in range(2):
        others = [f for f in linears if f.startswith(f"model.layers.{i}.") and f != downs[i]]
        if sequential:
            round_in(others)
        here = _inputs_of(rounded, [norms[i], downs[i]], batches)
        r, xq = stream_f[norms[i]] - here[norms[i]], here[downs[i]]
        want = 2.0 * r.T @ xq / xq.shape[0]
        assert torch.allclose(gaps[downs[i]], want, rtol=1e-4, atol=1e-6), i
        round_in([*others, downs[i]])
    # the first layer reads the same stream in both models until its own linears: no gap,
    # unless its attention is rounded first
    assert (torch.count_nonzero(gaps[downs[0]]) > 0) == sequential
    assert torch.count_nonzero(gaps[downs[1]]) > 0


@torch.no_grad()
def test_gptaq_residual_does_nothing_when_the_last_linear_is_not_rounded_by_gptaq(monkeypatch):
    # the down projections kept float: the term has no linear to move (o_proj, the last one
    # rounded, is not the layer's last linear and gets no gap)
    from edgequant import algorithms

    model = _tiny_llama()
    linears = [n for n in _layer_linears(model) if "mlp" not in n]
    gaps: list = []
    original = algorithms.gptaq_target

    def recording(weight, hessian, shift, alpha, damp=0.01, gap=None, beta=0.0):
        gaps.append(gap)
        return original(weight, hessian, shift, alpha, damp, gap, beta)

    monkeypatch.setattr(algorithms, "gptaq_target", recording)
    scheme = _gptq_int4(gptaq=0.25, gptaq_residual=0.5)
    found = layerwise.run(model, {f: scheme for f in linears}, _batches())
    assert sorted(found) == sorted(linears)
    assert len(gaps) == len(linears) and all(g is None for g in gaps)


def test_gptaq_residual_is_refused_where_a_norm_follows_the_last_linear():
    model = _gemma3_with_local_and_global_layers()
    linears = _layer_linears(model)
    scheme = _gptq_int4(gptaq=0.25, gptaq_residual=0.5)
    with pytest.raises(ValueError) as e:
        layerwise.run(model, {f: scheme for f in linears}, _batches())
    assert str(e.value) == (
        "gptaq_residual: model.layers.0.mlp.down_proj, the layer's last linear, does not add "
        "its output to the residual stream (a norm or another op follows it); drop "
        "gptaq_residual"
    )


def test_gptaq_refuses_a_linear_outside_the_layers_that_is_not_the_head(monkeypatch):
    # before any work: the first layer's inputs are not even gathered
    def refuse(*args):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(layerwise, "_layer_inputs", refuse)

    model = _tiny_llama()
    scheme = _gptq_int4(gptaq=0.25)
    with pytest.raises(ValueError) as e:
        layerwise.LayerByLayer(model, {"model.embed_tokens": scheme}, _batches())
    assert str(e.value) == (
        "gptaq: ['model.embed_tokens'] are outside the decoder layers and are not the model's "
        "head (the linear reading its final norm); GPTAQ rounds only those; drop gptaq for them"
    )


@torch.no_grad()
@pytest.mark.parametrize("fits", [True, False])
def test_gptaq_by_stages_with_the_residual_term_gives_the_next_layer_the_rounded_layers_output(
    monkeypatch, fits
):
    # the last stage runs the whole layer with all but the down projection rounded: its output
    # less the down projection's float output plus the rounded one's is the next layer's input
    # with one pass fewer; past TWIN_ROWS_BYTES the layer runs again
    model = _tiny_llama()
    batches = _batches()
    linears = _layer_linears(model)
    scheme = _gptq_int4(gptaq=0.25, sequential=True, gptaq_residual=0.5)
    if not fits:
        monkeypatch.setattr(layerwise, "TWIN_ROWS_BYTES", 0)
    steps = layerwise.LayerByLayer(model, {f: scheme for f in linears}, batches)
    layer = steps.layers[0]
    contexts = steps.contexts[0]
    given = [((args[0], *rest), kwargs)
             for (args, _), (rest, kwargs) in zip(steps.inputs, contexts, strict=True)]  # fmt: skip
    runs = []  # the float twin is a copy of the layer, hook and all: the layer's own runs
    handle = layer.register_forward_hook(lambda m, a, out: runs.append(m is layer))
    steps.step(0)
    handle.remove()
    whole = [layer(*args, **kwargs) for args, kwargs in given]  # layer 0 as rounded
    for got, want in zip(steps.hidden(), whole, strict=True):
        want = layerwise._hidden(want)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got, want) == (not fits)
    # the layer's whole runs: the last stage's, and once more without the room; 4 more on the
    # first batch (`_stages` twice, `_adds_to_stream` twice)
    assert sum(runs) == 4 + len(batches) * (1 if fits else 2)
