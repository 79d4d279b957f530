"""edgequant.mixed: budgets, candidates per target, sensitivity and the knapsack."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

import edgequant
from edgequant import eval as ev
from edgequant import mixed
from edgequant.mixed import Option
from edgequant.models.base import logits
from edgequant.schemes import Scheme


def test_budgets_parse_and_refuse_what_is_not_a_budget():
    assert mixed.parse_budget("4.5bpw").bytes_for(1000) == 562
    assert mixed.parse_budget("92.5MB").bytes_for(10) == 92_500_000
    assert mixed.parse_budget("2 MiB").bytes_for(10) == 2 * 2**20
    for bad in ("4.5", "-3MB", "0bpw", "12 parsecs", ""):
        with pytest.raises(ValueError, match=r"give bits per weight \(e.g. 4.5bpw\) or a size"):
            mixed.parse_budget(bad)


def test_candidates_are_what_every_named_target_runs():
    pte = mixed.candidates(["pte"], "linear")
    assert [s.describe() for s in pte][:2] == [
        "int4 g32 sym fp16-scales, act int8 dynamic asym",
        "int4 g64 sym fp16-scales, act int8 dynamic asym",
    ]
    assert mixed.candidates(["pte", "tflite"], "linear") == pte  # LiteRT runs each of them
    both = mixed.candidates(["pte", "gguf"], "embedding")
    assert [s.describe() for s in both] == ["int4 g32 sym fp16-scales", "fp16"]
    with pytest.raises(ValueError, match=r"targets \['coreml'\]: choose one or more of"):
        mixed.candidates(["coreml"], "linear")


def _brute_force(groups, budget):
    best = None
    for choice in itertools.product(*(range(len(o)) for o in groups.values())):
        opts = [o[k] for o, k in zip(groups.values(), choice, strict=True)]
        size, cost = sum(o.bytes for o in opts), sum(o.cost for o in opts)
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(20))
def test_allocation_is_the_least_cost_that_fits(seed):
    g = torch.Generator().manual_seed(seed)
    groups = {}
    for name in "abcde":
        n = int(torch.randint(1, 4, (1,), generator=g))
        sizes = torch.randint(1, 40, (n,), generator=g).tolist()
        costs = torch.rand(n, generator=g).tolist()
        groups[name] = [Option(None, s, c) for s, c in zip(sizes, costs, strict=True)]
    low = sum(min(o.bytes for o in opts) for opts in groups.values())
    high = sum(max(o.bytes for o in opts) for opts in groups.values())
    budget = int(torch.randint(low, high + 1, (1,), generator=g))
    chosen = mixed.allocate(groups, budget)  # 1-byte steps here: exact
    opts = [groups[n][k] for n, k in chosen.items()]
    assert list(chosen) == list(groups)
    assert sum(o.bytes for o in opts) <= budget
    assert sum(o.cost for o in opts) == pytest.approx(_brute_force(groups, budget), abs=1e-12)


def test_a_budget_of_the_smallest_total_is_every_group_at_its_smallest():
    # sizes far above the step (10 steps here): rounding whole sizes up refused this budget
    groups = {n: [Option(None, 1_000_003, 0.0), Option(None, 700_001, 1.0 + i)]
              for i, n in enumerate("abc")}  # fmt: skip
    low = 3 * 700_001
    assert mixed.allocate(groups, low, units=10) == {"a": 1, "b": 1, "c": 1}
    # room for one group at its largest: the costliest one at its smallest goes up
    assert mixed.allocate(groups, low + 300_010, units=10) == {"a": 1, "b": 1, "c": 0}


def test_allocation_refuses_budgets_out_of_reach():
    groups = {"a": [Option(None, 10, 0.0), Option(None, 3, 1.0)], "b": [Option(None, 5, 0.0)]}
    with pytest.raises(
        ValueError,
        match=r"a budget of 7 bytes is outside what these modules can "
        r"store: from 8 \(every module at its smallest scheme\) to 15 bytes",
    ):
        mixed.allocate(groups, 7)
    with pytest.raises(ValueError, match="a budget of 16 bytes is outside"):
        mixed.allocate(groups, 16)
    assert mixed.allocate(groups, 8) == {"a": 1, "b": 0}
    assert mixed.allocate(groups, 15) == {"a": 0, "b": 0}


def test_a_tied_embedding_and_head_are_one_group(tiny_hf_llama):
    model = copy.deepcopy(tiny_hf_llama)
    model.lm_head.weight = model.model.embed_tokens.weight
    groups = mixed.groups_of(model)
    assert groups[0].fqns == ("model.embed_tokens", "lm_head") and groups[0].kind == "embedding"
    assert [g.name for g in groups[1:3]] == ["model.layers.0.self_attn.q_proj",
                                             "model.layers.0.self_attn.k_proj"]  # fmt: skip
    assert len(groups) == 1 + 2 * 7 and groups[1].layer == 0
    apart = mixed.groups_of(model, apart=True)  # what a .pte stores: a copy for each
    assert [(g.fqns, g.kind, g.tied_with) for g in apart[:2]] == [
        (("model.embed_tokens",), "embedding", None),
        (("lm_head",), "linear", "model.embed_tokens"),
    ]
    assert mixed.counted_weights(apart) == mixed.counted_weights(groups)
    assert mixed.decided_apart(["pte"]) and not mixed.decided_apart(["pte", "gguf"])


INT4 = Scheme("int4", "per_group", 32, scale_dtype="fp16", activation="int8_dynamic")


@pytest.mark.parametrize("target", ["pte", "tflite"])
def test_written_bytes_are_what_the_file_spends(target, tmp_path):
    """A tied embedding and head as int8, int4 g32 and fp16 (the rest float): the files differ
    by what `stored_bytes` counts for the target (the .pte keeps the tied weight twice; the
    .tflite's int4 lookup table and head are one tensor)."""
    import transformers

    from edgequant.export import to_pte, to_tflite

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    tied = mixed.groups_of(model)[0]
    assert tied.fqns == ("model.embed_tokens", "lm_head")
    sizes, counted = [], []
    schemes = [Scheme("int8", activation="int8_dynamic"), INT4, Scheme("fp16")]
    assert all(s in mixed.options_for(tied, [target]) for s in schemes)
    for k, scheme in enumerate(schemes):
        packed, _ = edgequant.quantize(copy.deepcopy(model), mixed.group_recipe({tied: scheme}))
        path = (to_pte if target == "pte" else to_tflite)(packed, tmp_path / f"{k}.{target}")
        sizes.append(path.stat().st_size)
        counted.append(mixed.stored_bytes(tied, scheme, [target]))
        if target == "pte":
            assert counted[-1] == 2 * mixed.stored_bytes(tied, scheme)  # the bundle's, twice
    for k in (1, 2):
        assert sizes[k] - sizes[0] == pytest.approx(counted[k] - counted[0], rel=0.01), schemes[k]
    assert mixed.stored_bytes(tied, None, ["tflite", "pte"]) == 2 * 4 * 4096 * 64  # the largest


def test_written_bytes_of_each_gguf_candidate(stories260k, tmp_path):
    """stories260K's tied embedding and head as each GGUF candidate (the rest float): the files
    differ by what `stored_bytes` counts (Q4_0, Q5_0, Q8_0 blocks of 18, 22, 34 bytes; F16)."""
    from edgequant.export import to_gguf

    model, tok = stories260k
    tied = mixed.groups_of(model)[0]
    assert tied.fqns == ("tok_embeddings", "output")
    schemes = mixed.options_for(tied, ["gguf"])[:-1]  # 64 wide: no K-quant
    assert [s.weight for s in schemes] == ["int4", "int5", "int8", "fp16"]
    sizes, counted = [], []
    for k, scheme in enumerate(schemes):
        packed, _ = edgequant.quantize(copy.deepcopy(model), mixed.group_recipe({tied: scheme}))
        sizes.append(to_gguf(packed, tmp_path / f"{k}.gguf", tokenizer=tok).stat().st_size)
        counted.append(mixed.stored_bytes(tied, scheme, ["gguf"]))
    assert counted[1] == 512 * 64 // 32 * 22 < mixed.stored_bytes(tied, schemes[1])  # 5.5 bpw
    gptq = dataclasses.replace(schemes[1], algorithm="gptq", activation="int8_dynamic")
    assert mixed.stored_bytes(tied, gptq, ["gguf"]) == counted[1]  # however it was rounded
    for k in range(1, len(schemes)):
        assert sizes[k] - sizes[0] == pytest.approx(counted[k] - counted[0], rel=0.01), schemes[k]


def test_k_quants_are_gguf_candidates_where_rows_allow(stories260k, tmp_path):
    """A random Llama with 256-wide rows: its linears take llama.cpp's K-quants (a 64-wide
    model's do not); a file's bytes grow by what `stored_bytes` counts for them."""
    from edgequant.export import to_gguf

    model = _llama_256(layers=1, vocab=512, tied=True)
    down = next(g for g in mixed.groups_of(model) if g.name.endswith("down_proj"))
    weights = [s.weight if s else None for s in mixed.options_for(down, ["gguf"], "gptq")]
    assert weights == ["int4", "int5", "int8", "q3_k", "q4_k", "q5_k", "q6_k", "fp16", None]
    assert mixed.options_for(down, ["gguf"], "gptq")[5] == Scheme("q5_k", algorithm="imatrix")
    assert mixed.options_for(down, ["gguf"], "hqq")[5] == Scheme("q5_k")
    assert mixed.options_for(down, ["pte", "gguf"]) == [Scheme("fp16"), None]
    sizes, counted = [], []
    q8_0 = Scheme("int8", "per_group", 32, scale_dtype="fp16")
    for k, scheme in enumerate((q8_0, Scheme("q6_k"), Scheme("q3_k"))):
        packed, _ = edgequant.quantize(copy.deepcopy(model), mixed.group_recipe({down: scheme}))
        sizes.append(
            to_gguf(packed, tmp_path / f"{k}.gguf", tokenizer=stories260k[1]).stat().st_size
        )
        counted.append(mixed.stored_bytes(down, scheme, ["gguf"]))
    assert counted[1:] == [256 * 2 * 210, 256 * 2 * 110]  # [256, 512]: 2 blocks of 256 a row
    for k in (1, 2):
        assert sizes[k] - sizes[0] == pytest.approx(counted[k] - counted[0], rel=0.01)


def test_sensitivity_is_the_kl_of_the_model_with_that_group_alone_quantized(tiny_hf_llama):
    model = copy.deepcopy(tiny_hf_llama)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: the embedding runs it all
    groups = mixed.groups_of(model)
    windows = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    picked = {groups[0]: [None, INT4], groups[8]: [INT4, Scheme("int8")],
              groups[14]: [INT4]}  # fmt: skip
    measured = mixed.sensitivity(model, picked, windows, measure="every")
    with torch.inference_mode():
        reference = logits(model, windows)
        for group, schemes in picked.items():
            for scheme, kl in zip(schemes, measured[group], strict=True):
                if scheme is None:
                    assert kl == 0.0
                    continue
                q, _ = edgequant.quantize(copy.deepcopy(model),
                                          mixed.group_recipe({group: scheme}))  # fmt: skip
                want = ev.compare(reference, logits(q, windows), windows)["kl_divergence"]
                assert kl == pytest.approx(want, rel=1e-9, abs=1e-12), (group.name, scheme)
    assert measured[groups[8]][0] > measured[groups[8]][1] > 0  # int4 costs more than int8


def _float_inputs(model, module, batches) -> torch.Tensor:
    """The inputs the float model gives ``module`` on ``batches``, ``[tokens, features]``."""
    inputs = []
    hook = module.register_forward_hook(lambda m, args, out: inputs.append(args[0][0]))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    hook.remove()
    return torch.cat(inputs)


def _gptq_by_hand(model, module, scheme, batches):
    """GPTQ of ``module`` on the Hessian of the inputs the float model gives it on ``batches``."""
    from edgequant import algorithms
    from edgequant.layers import linear_weight

    x = _float_inputs(model, module, batches)
    return algorithms.gptq(linear_weight(module), scheme, algorithms.hessian(x))


def _llama_256(layers: int, vocab: int, tied: bool):
    """A random Llama whose rows are multiples of 256 (hidden 256, feed-forward 512): llama.cpp's
    K-quants fit them."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_imatrix_candidates_are_rounded_with_the_float_models_inputs():
    """A K-quant candidate of a GPTQ budget is llama.cpp's rounding weighed by the mean square
    of each input column the float model gives the module."""
    from edgequant import kquants

    model = _llama_256(layers=2, vocab=128, tied=True)
    group = next(g for g in mixed.groups_of(model) if g.name == "model.layers.1.mlp.down_proj")
    q4_k = Scheme("q4_k").rounded_by("gptq")
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 128, (1, 32), generator=generator) for _ in range(3)]
    rounded = mixed.gptq_rounded(model, {group: [q4_k, Scheme("q4_k"), None]}, batches)
    assert list(rounded) == [(group, q4_k)]
    module = model.get_submodule(group.name)
    x = _float_inputs(model, module, batches)
    want = kquants.quantize(module.weight, "q4_k", (x * x).mean(0))
    same = (rounded[group, q4_k].blocks == want).float().mean()
    plain = (kquants.quantize(module.weight, "q4_k") == want).float().mean()
    assert same > 0.995 and plain < 0.95, (same, plain)  # the Hessian's summation order


def test_gptq_candidates_are_rounded_by_gptq_on_the_float_models_inputs(tiny_hf_llama):
    model = copy.deepcopy(tiny_hf_llama)
    group = next(g for g in mixed.groups_of(model) if g.name == "model.layers.1.mlp.down_proj")
    gptq = INT4.rounded_by("gptq")
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 128, (1, 32), generator=generator) for _ in range(3)]
    rounded = mixed.gptq_rounded(model, {group: [gptq, INT4, None]}, batches)
    assert list(rounded) == [(group, gptq)]  # only the GPTQ candidate
    want = _gptq_by_hand(model, model.get_submodule(group.name), gptq, batches)
    same = (rounded[group, gptq].int_weight() == want.q).float().mean()
    assert same > 0.99, same  # the Hessians differ only in summation order
    # the sensitivity estimates with that module when given the calibration, mse's without
    windows = torch.randint(0, 128, (2, 24), generator=generator)
    options = {group: [gptq]}
    with_gptq = mixed.sensitivity(model, options, windows, calibration=batches)[group][0]
    by_hand = mixed.fisher_estimates(model, options, windows, rounded)[group, gptq]
    assert with_gptq == by_hand != mixed.sensitivity(model, options, windows)[group][0]
    every = mixed.sensitivity(model, options, windows, measure="every", calibration=batches)
    assert every != mixed.sensitivity(model, options, windows, measure="every")


def test_an_untied_heads_gptq_candidates_are_rounded_on_the_final_norms_outputs(
    tiny_hf_llama,
):
    model = copy.deepcopy(tiny_hf_llama)
    head = model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied
    model.model.norm.weight.data.uniform_(0.5, 1.5)
    (group,) = [g for g in mixed.groups_of(model) if g.name == "lm_head"]
    gptq = INT4.rounded_by("gptq")
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 128, (1, 32), generator=generator) for _ in range(3)]
    rounded = mixed.gptq_rounded(model, {group: [gptq, INT4, None]}, batches)
    assert list(rounded) == [(group, gptq)]
    want = _gptq_by_hand(model, head, gptq, batches)
    same = (rounded[group, gptq].int_weight() == want.q).float().mean()
    assert same > 0.99, same  # the Hessians differ only in summation order
    # a head reading the embedding's weight is stored with it: mse rounds it, not GPTQ
    tied = copy.deepcopy(tiny_hf_llama)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    apart = [g for g in mixed.groups_of(tied, apart=True) if g.name == "lm_head"]
    assert apart and apart[0].tied_with is not None
    assert mixed.gptq_rounded(tied, {apart[0]: [gptq, None]}, batches) == {}


def test_fisher_estimates_rank_like_measuring_every_option(tiny_hf_llama):
    model = copy.deepcopy(tiny_hf_llama)
    groups = mixed.groups_of(model)
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    options = {g: mixed.options_for(g, ["pte"]) for g in groups}
    every = mixed.sensitivity(model, options, windows, measure="every")
    fisher = mixed.sensitivity(model, options, windows)
    assert fisher == mixed.sensitivity(model, options, windows)  # seeded: deterministic
    pairs = []
    for g in groups:
        if g.layer is None:  # the embedding and head are measured
            assert fisher[g] == every[g]
            continue
        assert fisher[g][-1] == every[g][-1] == 0.0  # float
        pairs += list(zip(fisher[g][:-1], every[g][:-1], strict=True))
    assert len(pairs) == sum(len(options[g]) - 1 for g in groups if g.layer is not None) > 40
    rho = mixed.rank_correlation([a for a, _ in pairs], [b for _, b in pairs])
    assert rho > 0.9, rho
    ratio = sum(a for a, _ in pairs) / sum(b for _, b in pairs)
    assert 0.3 < ratio < 3, ratio  # an estimate of the same KL, not only of its ranks
    assert all(p.requires_grad for p in model.parameters())  # given back as it was
    with pytest.raises(ValueError, match="measure 'all': choose one of"):
        mixed.sensitivity(model, options, windows, measure="all")


def test_rank_correlation_is_spearmans():
    assert mixed.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert mixed.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
    assert mixed.rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, 1e-6)


def test_the_budget_recipe_fits_and_is_an_ordinary_recipe(tiny_hf_llama, tmp_path):
    model = copy.deepcopy(tiny_hf_llama)
    windows = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    recipe, facts = mixed.budget_recipe(model, "6bpw", ["pte"], windows)
    n_weights = sum(g.n_weights for g in mixed.groups_of(model))
    assert facts["budget_bytes"] == 6 * n_weights // 8
    assert facts["allocated_bytes"] <= facts["budget_bytes"]
    assert facts["predicted_kl"] == pytest.approx(sum(m["kl"] for m in facts["modules"]))
    schemes = {m["scheme"] for m in facts["modules"]}
    assert len(schemes) > 1  # mixed: not one scheme everywhere
    q, plan = edgequant.quantize(copy.deepcopy(model), recipe)
    assert plan.bytes_after == facts["allocated_bytes"]  # what was allocated is stored
    from edgequant.recipe import Recipe

    again = Recipe.from_dict(recipe.to_dict())  # the recipe round-trips as any other
    assert edgequant.plan(model, again).to_dict() == plan.to_dict() | {"recipe": again.to_dict()}
    low, high = facts["reachable_bytes"]
    with pytest.raises(ValueError, match=f"from {low:,} .* to {high:,} bytes"):
        mixed.budget_recipe(model, "1bpw", ["pte"], windows)


def test_the_job_refuses_a_budget_it_cannot_allocate(tmp_path):
    from edgequant import job

    out = tmp_path / "b"
    with pytest.raises(ValueError, match="--budget chooses the recipe: drop --recipe"):
        job.run("stories260k", "8da4w", out, budget="4.5bpw", targets="gguf")
    with pytest.raises(ValueError, match=r"--budget chooses among the schemes a runtime runs "
                       r"exactly: pass --targets \(pte, tflite, gguf"):  # fmt: skip
        job.run("stories260k", None, out, budget="4.5bpw")
    with pytest.raises(ValueError, match="budget '4.5': give bits per weight"):
        job.run("stories260k", None, out, budget="4.5", targets="gguf")
    with pytest.raises(ValueError, match="--budget needs the whole float model in memory"):
        job.run("stories260k", None, out, budget="6bpw", targets="gguf", stream=True)
    with pytest.raises(ValueError, match="give a recipe .* or a budget"):
        job.run("stories260k", None, out)
    assert not out.exists()


def test_quantize_with_a_budget_writes_the_chosen_recipe_and_its_file(tmp_path):
    """With --rotate too: the sensitivity of the rotated model, its untied head allocated on
    its own, the rotation in the bundle's recipe, and llama.cpp runs the rotated file."""
    import json

    from edgequant.cli import main

    out = tmp_path / "bundle"
    assert main(["quantize", "--model", "stories260k", "--budget", "12bpw", "--targets", "gguf",
                 "--out", str(out), "--eval-windows", "1", "--seq-len", "64",
                 "--speed-rounds", "1", "--rotate", "hadamard"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    allocation = report["allocation"]
    assert allocation["budget"] == "12bpw" and allocation["targets"] == ["gguf"]
    assert report["recipe"]["rotate"] == "hadamard" and report["bundle_reloads_identically"]
    assert ["output"] in [m["fqns"] for m in allocation["modules"]]  # untied by the rotation
    assert allocation["allocated_bytes"] <= allocation["budget_bytes"]
    # what other budgets would buy: 8 budgets from the fewest bytes to every module at 8 bits,
    # the predicted KL falling as they grow; the chosen budget's no worse than a smaller one's
    curve = allocation["curve"]
    low, high = allocation["reachable_bytes"]
    assert curve[0]["budget_bytes"] == low < curve[-1]["budget_bytes"] < high
    assert len(curve) == 8 and all(p["allocated_bytes"] <= p["budget_bytes"] for p in curve)
    kls = [p["predicted_kl"] for p in curve]
    assert kls == sorted(kls, reverse=True) and kls[-1] < kls[0]
    smaller = [p for p in curve if p["budget_bytes"] <= allocation["budget_bytes"]]
    assert allocation["predicted_kl"] <= smaller[-1]["predicted_kl"]
    page = (out / "report.html").read_text()  # the card shows the allocation and the curve
    assert "The budget's allocation" in page and "the budget: predicted and measured" in page
    assert f"{allocation['allocated_bytes']:,} bytes" in page
    chosen = {m["scheme"] for m in allocation["modules"]}
    assert chosen <= {"int4 g32 sym fp16-scales", "int5 g32 sym fp16-scales",
                      "int8 g32 sym fp16-scales", "fp16", None}  # fmt: skip
    assert report["recipe"]["name"] == "budget-12bpw"
    assert edgequant.load(out).edgequant_recipe.to_dict() == report["recipe"]
    gguf = report["targets"]["gguf"]  # llama.cpp runs every chosen scheme as stored
    assert "skipped" not in gguf and gguf["fallback"] is None, gguf
    assert abs(gguf["kl_divergence"] - gguf["eager_kl_divergence"]) < 0.01


def test_plan_shows_the_allocation_of_a_budget(capsys):
    from edgequant.cli import main

    assert main(["plan", "--model", "stories260k", "--budget", "10bpw", "--targets", "gguf"]) == 0
    out = capsys.readouterr().out
    assert "budget 10bpw (" in out and "predicted KL" in out
    assert "fp16" in out or "int8 g32 sym fp16-scales" in out
    assert main(["plan", "--model", "stories260k", "--budget", "10bpw"]) == 2
    assert "--budget chooses among the schemes a runtime runs exactly" in capsys.readouterr().err


def test_recipe_bytes_count_what_each_target_writes(tiny_hf_llama):
    from edgequant.recipe import Recipe, Rule

    model = copy.deepcopy(tiny_hf_llama)
    model.lm_head.weight = model.model.embed_tokens.weight
    groups = mixed.groups_of(model)
    tied = groups[0]
    int8 = Scheme("int8", activation="int8_dynamic")
    one = mixed.stored_bytes(tied, int8)
    everything = Recipe([Rule(int8, role="default")])
    bundle = mixed.recipe_bytes(model, everything)
    assert bundle == sum(mixed.stored_bytes(g, int8) for g in groups)  # the tied pair once
    assert mixed.recipe_bytes(model, everything, ["pte"]) == bundle + one  # twice in a .pte
    # the embedding int8 weight-only, the head int8 dynamic: two storages for every target
    apart = Recipe([Rule(int8, role="default"), Rule(Scheme("int8"), role="embedding")])
    assert mixed.recipe_bytes(model, apart, ["gguf"]) == bundle + one
    assert mixed.recipe_bytes(model, apart, ["pte"]) == bundle + one
    floating = Recipe([Rule(int8, role="default"), Rule(None, role="embedding"),
                       Rule(None, role="lm_head")])  # fmt: skip
    assert mixed.recipe_bytes(model, floating, ["gguf"]) == sum(
        mixed.stored_bytes(g, None if g is tied else int8) for g in groups
    )  # the float pair once
    # a rotation unties the head (the final norm's weight folds into it): two storages in a
    # .tflite or GGUF file too, none more in the .pte
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    rotating = dataclasses.replace(everything, rotate="hadamard")
    assert mixed.recipe_bytes(model, rotating) == bundle + one
    assert mixed.recipe_bytes(model, rotating, ["gguf"]) == bundle + one
    assert mixed.recipe_bytes(model, rotating, ["pte"]) == bundle + one
    # a float pair the rotation unties: two float tensors in every file
    float_tensor = mixed.stored_bytes(tied, None)
    floating_rotated = dataclasses.replace(floating, rotate="hadamard")
    assert (
        mixed.recipe_bytes(model, floating_rotated, ["gguf"])
        == sum(mixed.stored_bytes(g, None if g is tied else int8) for g in groups) + float_tensor
    )


def test_a_pte_budget_decides_a_tied_embedding_and_head_apart(tiny_hf_llama):
    """The .pte stores the tied pair as two tensors anyway: each gets its own choice, and the
    file's bytes (not the bundle's) are what fits the budget."""
    model = copy.deepcopy(tiny_hf_llama)
    model.lm_head.weight = model.model.embed_tokens.weight
    windows = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    recipe, facts = mixed.budget_recipe(model, "6bpw", ["pte"], windows)
    chosen = {m["fqns"][0]: m["scheme"] for m in facts["modules"]}
    assert ["model.embed_tokens"] in [m["fqns"] for m in facts["modules"]]
    assert ["lm_head"] in [m["fqns"] for m in facts["modules"]]
    assert facts["budget_bytes"] == 6 * mixed.counted_weights(mixed.groups_of(model)) // 8
    assert facts["allocated_bytes"] <= facts["budget_bytes"]
    assert mixed.recipe_bytes(model, recipe, ["pte"]) == facts["allocated_bytes"]
    plan = edgequant.plan(model, recipe)
    for fqn in ("model.embed_tokens", "lm_head"):
        scheme = plan[fqn].scheme
        assert (None if scheme is None else scheme.describe()) == chosen[fqn]
