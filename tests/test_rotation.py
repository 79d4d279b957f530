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
