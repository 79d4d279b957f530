from __future__ import annotations

import copy

import pytest
import torch

from edgequant import rotation
from edgequant.models.base import logits


def _families():
    """The decoder families' tiny models (tests/models/test_decoder_families.py's cases)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "models" / "test_decoder_families.py"
    spec = importlib.util.spec_from_file_location("decoder_family_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CASES = _families()
CASES, IDS, build = _CASES.CASES, _CASES.IDS, _CASES.build


@pytest.mark.parametrize("n", [2, 4, 12, 20, 48, 64, 576, 896, 1536])
def test_hadamard_matrices_are_hadamard(n):
    h = rotation.hadamard(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("kind", rotation.ROTATIONS)
def test_orthogonal_matrices_are_orthogonal_and_seeded(kind):
    q = rotation.orthogonal(96, kind, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(96, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation.orthogonal(96, kind, seed=3))
    assert not torch.equal(q, rotation.orthogonal(96, kind, seed=4))


def test_widths_without_a_hadamard_matrix_are_refused_naming_the_way_out():
    with pytest.raises(ValueError, match="no Hadamard matrix of order 36 .* use the 'random'"):
        rotation.orthogonal(36)
    assert rotation.orthogonal(36, "random").shape == (36, 36)
    with pytest.raises(ValueError, match="rotation 'learned': choose one of"):
        rotation.orthogonal(8, "learned")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] != "gemma3"])
@pytest.mark.parametrize("kind", rotation.ROTATIONS)
def test_the_rotated_float_model_gives_the_same_logits(case, kind):
    model = build(case)
    before_hf, before = model(IDS).logits.detach(), logits(model, IDS)
    rotated = copy.deepcopy(model)
    done = rotation.rotate(rotated, kind, seed=0)
    with torch.no_grad():
        after_hf, after = rotated(IDS).logits, logits(rotated, IDS)
    assert (after - before).abs().max() < 1e-4, case
    assert (after_hf - before_hf).abs().max() < 1e-4, case  # transformers' own forward too
    embedding, head = rotated.get_input_embeddings(), rotated.get_output_embeddings()
    assert not torch.allclose(embedding.weight, model.get_input_embeddings().weight)
    tied = model.config.tie_word_embeddings
    assert done["untied_head"] == tied  # the final norm's random weight is folded into the head
    assert embedding.weight.data_ptr() != head.weight.data_ptr()
    assert rotated.config.tie_word_embeddings is False


def test_a_head_sharing_the_embedding_without_the_config_flag_is_turned_once():
    """The tensor, not the config, says whether the head reads the embedding."""
    model = build("llama")
    model.config.tie_word_embeddings = False  # still one tensor
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = logits(model, IDS)
    done = rotation.rotate(model, "hadamard")
    assert done["untied_head"] and model.lm_head.weight is not model.model.embed_tokens.weight
    assert (logits(model, IDS) - before).abs().max() < 1e-4


def test_a_llama2c_decoder_rotates_and_keeps_its_logits(stories260k):
    model = copy.deepcopy(stories260k[0])
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    done = rotation.rotate(model, "random")
    assert (logits(model, ids) - before).abs().max() < 1e-4
    assert done["untied_head"] == stories260k[0].spec.tied_embedding


def test_gemma3_and_quantized_models_are_refused():
    with pytest.raises(ValueError, match="Gemma 3's sandwich norms"):
        rotation.rotate(build("gemma3"))
    import edgequant

    q, _ = edgequant.quantize(build("llama"), "8da4w")
    with pytest.raises(ValueError, match="rotate the float model, before quantizing"):
        rotation.rotate(q)


def test_a_recipe_that_rotates_quantizes_saves_and_reloads(tmp_path):
    """``rotate`` in a recipe: the plan unties the head the rotation unties, the rotated model
    is rounded, and the bundle (recipe and untied head) reloads to the same logits, on its
    own and over the float model's tied skeleton."""
    import dataclasses

    import edgequant
    from edgequant import eval as ev
    from edgequant._modules import shallow_copy
    from edgequant.recipes import get

    model = build("llama")
    assert model.config.tie_word_embeddings
    recipe = dataclasses.replace(get("int8-dynamic"), rotate="hadamard")
    plain = edgequant.plan(model, get("int8-dynamic"))
    before = edgequant.plan(model, recipe)
    head = [lp for lp in before if lp.fqn == "lm_head"][0]
    assert [lp for lp in plain if lp.fqn == "lm_head"][0].tied_to == "model.embed_tokens"
    assert head.tied_to is None and before.bytes_after > plain.bytes_after  # its own storage
    float_logits = logits(model, IDS).detach()
    q, p = edgequant.quantize(copy.deepcopy(model), recipe)
    assert p.to_dict()["layers"] == before.to_dict()["layers"]
    assert q.config.tie_word_embeddings is False
    got = logits(q, IDS).detach()
    kl = ev.compare(float_logits, got, IDS)["kl_divergence"]
    assert kl < 0.01
    edgequant.save(q, tmp_path / "b")
    alone = edgequant.load(tmp_path / "b")
    over_float = edgequant.load(tmp_path / "b", model=shallow_copy(model))
    assert alone.edgequant_recipe.rotate == "hadamard"
    assert torch.equal(logits(alone, IDS), got) and torch.equal(logits(over_float, IDS), got)


def test_a_streamed_run_refuses_to_rotate(tmp_path):
    from edgequant import job

    with pytest.raises(ValueError, match="--rotate needs the whole float model in memory"):
        job.run("stories260k", "8da4w", tmp_path / "b", stream=True, rotate="hadamard")
    with pytest.raises(ValueError, match=r"rotate 'spin' is not one of \['hadamard', 'random'\]"):
        job.run("stories260k", "8da4w", tmp_path / "b", rotate="spin")


def test_an_algorithm_given_to_a_rotating_recipe_keeps_the_rotation():
    """``quantize --recipe FILE --algorithm gptq`` over a recipe file that rotates: the job's
    recipe still rotates."""
    import dataclasses

    from edgequant.job import with_algorithm
    from edgequant.recipes import get

    recipe = dataclasses.replace(get("8da4w"), rotate="random")
    changed = with_algorithm(recipe, "gptq")
    assert changed.rotate == "random" and changed.name == "8da4w+gptq"
    assert {r.scheme.algorithm for r in changed.rules if r.scheme} == {"gptq"}
