"""graph.quantize end to end: static int8 on a CNN, dynamic int8 on MiniLM, QAT prepare, the
.pte of a converted graph, and bad input."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgequant import graph
from edgequant.export.pte_runtime import PteProgram
from edgequant.primitives import sqnr

SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
    "The cat sits outside on the mat.",
    "Quantization keeps most of a model's accuracy at a quarter of its size.",
]


def test_static_int8_cnn_keeps_25_db(cnn, images):
    x, calibration = images
    converted = graph.quantize(cnn, (x,), "int8-static", calibration=calibration)
    with torch.no_grad():
        db = sqnr(cnn(x), converted(x))
    assert db >= 25.0  # measured 43.1 dB
    targets = [str(n.target) for n in converted.graph.nodes if n.op == "call_function"]
    assert "aten.batch_norm.default" not in targets  # folded into the convolutions
    assert targets.count("quantized_decomposed.dequantize_per_channel.default") == 4  # 3 conv + fc


class SentenceEncoder(nn.Module):
    """Mean-pooled, normalised sentence embeddings, as sentence-transformers computes them."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def test_dynamic_int8_minilm_embeddings_keep_cosine_099(minilm):
    tokenizer, bert = minilm
    enc = tokenizer(SENTENCES, padding="max_length", max_length=32, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    model = SentenceEncoder(bert).eval()
    quantizer = graph.RecipeQuantizer("int8-dynamic")
    converted = graph.quantize(model, args, quantizer=quantizer)
    with torch.no_grad():
        cosine = F.cosine_similarity(model(*args), converted(*args))
    assert cosine.min().item() >= 0.99  # measured 0.9979 .. 0.9990 (per-token activations)
    linears = [d for d in quantizer.decisions if d.kind == "linear"]
    assert len(linears) == 36 and all(d.annotated for d in linears)  # 6 layers x 6 (no pooler)
    adds = [d for d in quantizer.decisions if d.kind == "add"]
    assert adds and all(d.scheme is None and "not 'int8_dynamic'" in d.note for d in adds)


def test_qat_prepare_inserts_fake_quant_and_converts(mlp):
    x = torch.randn(8, 64)
    prepared = graph.prepare(mlp, (x,), "int8-static", is_qat=True)
    fake = [m for m in prepared.modules() if isinstance(m, graph.FakeQuantizeBase)]
    assert len(fake) >= 6  # 3 weights and the activations around them
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for _ in range(3):  # a user's fine-tuning steps run through the fake quantizers
        loss = prepared(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fake_quantized = prepared(x)  # convert rewrites the prepared graph in place
    assert prepared.meta["edgequant_qat"] is True
    converted = graph.convert(prepared)
    with torch.no_grad():
        assert sqnr(fake_quantized, converted(x)) > 25.0


def test_converted_graph_runs_as_a_pte(cnn, images, tmp_path):
    x, calibration = images
    converted = graph.quantize(cnn, (x,), "int8-static", calibration=calibration)
    path = graph.to_pte(converted, (x,), tmp_path / "cnn.pte")
    out = PteProgram(path)(x)[0]
    with torch.no_grad():
        assert sqnr(converted(x), out) > 40.0  # XNNPACK's int8 kernels; measured identical
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        graph.to_pte(converted, (x,), path)
    bad = tmp_path / "bad.pte"
    bad.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="is not a loadable ExecuTorch program with a 'forward'"):
        PteProgram(bad)


def test_example_inputs_that_do_not_match_show_the_signature(cnn):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "example inputs (Tensor[1, 3, 16, 16] float32, Tensor[1] float32) do not match "
            "CNN.forward(x: 'torch.Tensor') -> 'torch.Tensor': too many positional arguments"
        ),
    ):
        graph.quantize(cnn, (torch.randn(1, 3, 16, 16), torch.randn(1)), "int8-dynamic")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "torch.export could not run CNN.forward(x: 'torch.Tensor') -> 'torch.Tensor' on "
            "example inputs (Tensor[1, 5, 16, 16] float32): "
        ),
    ):
        graph.quantize(cnn, (torch.randn(1, 5, 16, 16),), "int8-dynamic")
    with pytest.raises(TypeError, match="example_inputs must be a tuple"):
        graph.quantize(cnn, torch.randn(1, 3, 16, 16), "int8-dynamic")


def test_calibration_is_read_lazily_from_generators_and_dataloaders(cnn, images):
    x, calibration = images
    seen = []

    def batches():  # a generator: no len()
        for (b,) in calibration:
            seen.append(b)
            yield (b,)

    from_generator = graph.quantize(cnn, (x,), "int8-static", calibration=batches())
    assert len(seen) == 8
    loader = torch.utils.data.DataLoader(  # yields [tensor] lists (default collate)
        torch.utils.data.TensorDataset(torch.cat([b for (b,) in calibration])), batch_size=4
    )
    from_loader = graph.quantize(cnn, (x,), "int8-static", calibration=loader)
    with torch.no_grad():  # the same 8 batches observed: the same ranges
        assert torch.equal(from_generator(x), from_loader(x))
    prepared = graph.prepare(cnn, (x,), "int8-static")
    assert graph.calibrate(prepared, [{"x": b} for (b,) in calibration]) == 8  # keyword batches


def test_recipe_and_quantizer_arguments_are_checked(cnn, images):
    x, _ = images
    with pytest.raises(ValueError, match="pass recipe or quantizer, not both"):
        graph.quantize(cnn, (x,), "int8-dynamic", quantizer=graph.RecipeQuantizer("int8-dynamic"))
    with pytest.raises(ValueError, match="pass a recipe \\(a preset name, a file, a Recipe\\)"):
        graph.quantize(cnn, (x,))
    with pytest.raises(ValueError, match="made with is_qat=False but prepare got is_qat=True"):
        graph.prepare(cnn, (x,), quantizer=graph.RecipeQuantizer("int8-static"), is_qat=True)
    assert cnn.training is False  # capture leaves the user's module in its own mode
    cnn.train()
    graph.capture(cnn, (x,))
    assert cnn.training is True


def test_empty_or_missing_calibration_is_a_clear_error(cnn, images):
    x, _ = images
    with pytest.raises(ValueError, match="calibration is empty: static activations need"):
        graph.quantize(cnn, (x,), "int8-static", calibration=[])
    with pytest.raises(ValueError, match="static activations \\(int8_static\\): pass calibration"):
        graph.quantize(cnn, (x,), "int8-static")


def test_unknown_backend_lists_the_available_ones(cnn, images):
    x, _ = images
    with pytest.raises(ValueError, match="unknown backend 'tpu'; available: xnnpack, generic"):
        graph.quantize(cnn, (x,), "int8-static", backend="tpu")
