"""edgequant.stream: one decoder layer at a time gives the in-memory path's bundle, byte for
byte, and its numbers; a stopped run resumes to the same bundle; under a memory limit below the
float model's size the streaming path works and the in-memory one does not."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import edgequant
from edgequant import eval as ev
from edgequant import stream
from edgequant.calibration import Calibration
from edgequant.job import with_algorithm
from edgequant.models.lazy import open_source
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hf_folder(folder, *, hidden=64, ffn=128, layers=3, vocab=256, tied=False, dtype=None,
               shard="2GB", model_type="llama"):  # fmt: skip
    import transformers

    torch.manual_seed(0)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "gemma3_text": transformers.Gemma3TextConfig}[model_type]  # fmt: skip
    extra = {}
    if model_type == "gemma3_text":  # sliding-window layers with their own RoPE, then global
        kinds = ["sliding_attention", "full_attention"] * layers
        extra = dict(head_dim=16, sliding_window=8, layer_types=kinds[:layers])
    config = cls(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
        max_position_embeddings=128, tie_word_embeddings=tied, **extra,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    _byte_tokenizer().save_pretrained(folder)
    return folder


def _byte_tokenizer():
    """A tokenizer of one token per byte (256 tokens): loading a folder needs one."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre.ByteLevel.alphabet()))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))
    tk.pre_tokenizer = pre.Split("", "isolated")
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return _hf_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_qwen_tied(tmp_path_factory):
    return _hf_folder(tmp_path_factory.mktemp("qwen") / "model", model_type="qwen2", tied=True)


def _batches(n=3, length=24, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Calibration(
        tuple(torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)), "random ids"
    )


def _in_memory(folder, recipe, out, calibration, windows):
    model, _, _ = edgequant.models.load(folder)
    reference = ev.float_logits(model, windows)
    quantized, _ = edgequant.quantize(copy.deepcopy(model), recipe, calibration=calibration)
    edgequant.save(quantized, out)
    with torch.inference_mode():
        q = torch.stack([ev.model_logits(quantized, w[None])[0] for w in windows])
    return reference, ev.compare(reference, q, windows), ev.layer_sqnr(model, quantized)


def _mixed() -> Recipe:
    """int4 g32 hqq linears, int8 attention output, an int8 embedding and a float head."""
    return Recipe(
        (
            Rule(
                Scheme("int4", "per_group", 32, activation="int8_dynamic", algorithm="hqq"),
                role="default",
            ),
            Rule(Scheme("int8", activation="int8_dynamic"), module="re:.*o_proj"),
            Rule(Scheme("int8"), role="embedding"),
            Rule(None, role="lm_head"),
        ),
        name="mixed",
    )


def _float_embedding() -> Recipe:
    """8da4w on the decoder's linears, the embedding float, the head int8."""
    return Recipe(
        (
            Rule(Scheme("int4", "per_group", 32, activation="int8_dynamic"), role="default"),
            Rule(None, role="embedding"),
            Rule(Scheme("int8", activation="int8_dynamic"), role="lm_head"),
        ),
        name="linears",
    )


CASES = {
    "8da4w+gptq": lambda: with_algorithm(edgequant.recipes.get("8da4w"), "gptq"),
    "8da4w+awq": lambda: with_algorithm(edgequant.recipes.get("8da4w"), "awq"),
    "mixed": _mixed,
    "float embedding": _float_embedding,
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_bundle_and_numbers_equal_the_in_memory_path(case, tiny_folder, tmp_path):
    recipe = CASES[case]()
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    calibration = _batches()
    reference, metrics, sqnr = _in_memory(tiny_folder, recipe, tmp_path / "mem", calibration,
                                          windows)  # fmt: skip
    streamed = stream.quantize(open_source(tiny_folder), recipe, tmp_path / "st",
                               calibration=calibration, windows=windows)  # fmt: skip
    for name in ("model.safetensors", "manifest.json"):
        assert _digest(tmp_path / "st" / name) == _digest(tmp_path / "mem" / name), name
    assert torch.equal(torch.from_numpy(np.load(streamed.float_logits)), reference)
    assert streamed.metrics == metrics
    assert streamed.layers == sqnr
    streamed.finish()
    assert not stream.work_dir(tmp_path / "st").exists()


@pytest.mark.parametrize("case", ["8da4w+gptq", "float embedding"])
def test_tied_head_and_qwen_biases_equal_the_in_memory_path(case, tiny_qwen_tied, tmp_path):
    recipe = CASES[case]()
    windows = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))
    _, metrics, sqnr = _in_memory(tiny_qwen_tied, recipe, tmp_path / "mem", _batches(), windows)
    streamed = stream.quantize(open_source(tiny_qwen_tied), recipe, tmp_path / "st",
                               calibration=_batches(), windows=windows)  # fmt: skip
    assert _digest(tmp_path / "st/model.safetensors") == _digest(tmp_path / "mem/model.safetensors")
    assert streamed.metrics == metrics
    assert [r["fqn"] for r in streamed.layers] == [r["fqn"] for r in sqnr]
    assert streamed.layers == sqnr


def test_gemma3_with_sliding_window_layers_streams_to_the_same_bundle(tmp_path):
    folder = _hf_folder(tmp_path / "gemma3", model_type="gemma3_text", layers=3, tied=True)
    recipe = CASES["8da4w+gptq"]()
    windows = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(4))
    _, metrics, sqnr = _in_memory(folder, recipe, tmp_path / "mem", _batches(), windows)
    streamed = stream.quantize(open_source(folder), recipe, tmp_path / "st",
                               calibration=_batches(), windows=windows)  # fmt: skip
    assert _digest(tmp_path / "st/model.safetensors") == _digest(tmp_path / "mem/model.safetensors")
    assert streamed.metrics == metrics and streamed.layers == sqnr


def test_llama2c_checkpoint_streams_to_the_same_bundle(stories260k, tmp_path):
    from edgequant.data import stories260k_dir

    recipe = edgequant.recipes.get("int8-dynamic")
    model, _ = stories260k
    quantized, _ = edgequant.quantize(copy.deepcopy(model), recipe)
    edgequant.save(quantized, tmp_path / "mem")
    stream.quantize(open_source(stories260k_dir()), recipe, tmp_path / "st")
    for name in ("model.safetensors", "manifest.json"):
        assert _digest(tmp_path / "st" / name) == _digest(tmp_path / "mem" / name), name


def test_a_stopped_run_resumes_to_the_same_bundle(tiny_folder, tmp_path):
    recipe = with_algorithm(edgequant.recipes.get("8da4w"), "gptq")
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    whole = stream.quantize(open_source(tiny_folder), recipe, tmp_path / "whole",
                            calibration=_batches(), windows=windows)  # fmt: skip
    out = tmp_path / "stopped"
    with pytest.raises(stream.Stopped, match="stopped after layer 0"):
        stream.quantize(open_source(tiny_folder), recipe, out, calibration=_batches(),
                        windows=windows, stop_after=0)  # fmt: skip
    assert not out.exists()
    with pytest.raises(FileExistsError, match=r"holds a stopped run of this bundle \(1 of 3 "):
        stream.quantize(open_source(tiny_folder), recipe, out, calibration=_batches(),
                        windows=windows)  # fmt: skip
    with pytest.raises(ValueError, match="holds a stopped run with another recipe"):
        stream.quantize(open_source(tiny_folder), "int8-dynamic", out, calibration=_batches(),
                        windows=windows, resume=True)  # fmt: skip
    resumed = stream.quantize(open_source(tiny_folder), recipe, out, calibration=_batches(),
                              windows=windows, resume=True)  # fmt: skip
    assert _digest(out / "model.safetensors") == _digest(tmp_path / "whole/model.safetensors")
    assert _digest(out / "manifest.json") == _digest(tmp_path / "whole/manifest.json")
    assert resumed.layers == whole.layers
    assert np.array_equal(np.load(resumed.float_logits), np.load(whole.float_logits))


def test_the_job_streamed_reports_the_in_memory_jobs_numbers(tiny_folder, tmp_path):
    from edgequant import job

    text = tmp_path / "text.txt"
    text.write_text("once upon a time there was a tiny model that streamed. " * 20)
    options = dict(eval_windows=2, seq_len=48, text=text, algorithm="gptq",
                   calibration=f"file:{text}:2x32")  # fmt: skip
    whole = job.run(str(tiny_folder), "8da4w", tmp_path / "whole", stream=False, **options)
    streamed = job.run(str(tiny_folder), "8da4w", tmp_path / "streamed", stream=True, **options)
    assert streamed["streamed"] is True and "streamed" not in whole
    for key in ("kl_divergence", "perplexity", "float_perplexity", "top1_agreement",
                "bundle_reloads_identically",
                "quantized_bytes", "bits_per_weight", "layers", "recipe_resolved"):  # fmt: skip
        assert streamed[key] == whole[key], key
    assert streamed["float_decode_tokens_per_s"] is None
    assert _digest(tmp_path / "streamed/model.safetensors") == _digest(
        tmp_path / "whole/model.safetensors"
    )
    assert (tmp_path / "streamed/report.html").is_file()
    assert not stream.work_dir(tmp_path / "streamed").exists()


def test_window_digest_is_the_whole_models_logits_digest(tiny_folder, tmp_path):
    from edgequant.models.base import logits

    stream.quantize(open_source(str(tiny_folder)), "8da4w", tmp_path / "q").finish()
    model = edgequant.load(tmp_path / "q")
    window = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    kernels = [m for m in model.modules() if hasattr(m, "_kernel_cache")]
    with torch.inference_mode():
        digest = stream.window_digest(model, window)
        # the decoder layers' kernel copies dropped (the head's may stay: it runs last)
        in_layers = [m for m in model.model.layers.modules() if hasattr(m, "_kernel_cache")]
        assert in_layers and not any(set(m._kernel_cache) - {"name"} for m in in_layers)
        assert digest == stream.logits_digest(logits(model, window)[0])
        assert any(set(m._kernel_cache) - {"name"} for m in kernels)  # the whole run keeps them
        changed = model.model.layers[1].mlp.down_proj
        changed.scale.mul_(1.01)
        changed._kernel_cache.clear()  # the whole run's copy holds the old scales
        assert stream.window_digest(model, window) != digest


def test_the_streamed_reload_check_sees_a_bundle_that_differs(tiny_folder, tmp_path, monkeypatch):
    from edgequant import job

    load = edgequant.load

    def changed(*args, **kwargs):
        model = load(*args, **kwargs)
        model.model.layers[0].self_attn.o_proj.scale.mul_(1.01)
        return model

    monkeypatch.setattr(edgequant, "load", changed)
    report = job.run(str(tiny_folder), "8da4w", tmp_path / "r", stream=True, eval_windows=1,
                     seq_len=32, speed=False)  # fmt: skip
    assert report["bundle_reloads_identically"] is False


def test_the_job_streams_and_refuses_what_needs_the_float_model(tiny_folder, tmp_path):
    from edgequant import job

    with pytest.raises(ValueError, match="--compare needs the whole float model in memory"):
        job.run(str(tiny_folder), "int8-dynamic", tmp_path / "a", stream=True,
                compare_presets=True)  # fmt: skip
    with pytest.raises(ValueError, match="--resume continues a streaming run: pass --stream"):
        job.run(str(tiny_folder), "int8-dynamic", tmp_path / "a", stream=False, resume=True)
    with pytest.raises(ValueError, match="--targets times every model it measures: drop"):
        job.run(str(tiny_folder), "int8-dynamic", tmp_path / "a", targets="gguf", speed=False)


@pytest.mark.parametrize("streamed", [True, False])
def test_the_job_without_speed_times_nothing(streamed, tiny_folder, tmp_path, monkeypatch):
    from edgequant import eval as ev
    from edgequant import job

    def never(*args, **kwargs):
        raise AssertionError("timed with speed=False")

    monkeypatch.setattr(ev, "speed", never)
    if streamed:  # nothing runs on the bundle: it is not loaded (a 7B one is 4.3 GB)
        monkeypatch.setattr(edgequant, "load", never)
    report = job.run(str(tiny_folder), "int8-dynamic", tmp_path / "b", stream=streamed,
                     eval_windows=0, speed=False)  # fmt: skip
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "float_decode_tokens_per_s",
                "speed_prompt_tokens"):  # fmt: skip
        assert report[key] is None, key
    assert report["quantized_bytes"] > 0
    assert report["bundle_reloads_identically"] is (None if streamed else True)
    assert report["kernels"] == {"int8_dynamic": 22}  # 3 layers x 7 linears and the head
    assert "| int8-dynamic |" in (tmp_path / "b/report.md").read_text()


# ---- under a memory limit --------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import ctypes, json, resource, sys
    import torch
    import edgequant
    from edgequant import stream
    from edgequant.models.lazy import open_source

    path, out, how, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    torch.ones(256, 256) @ torch.ones(256, 256)  # the thread pool and allocator, before
    import edgequant.algorithms, edgequant.layerwise, safetensors.torch  # every import, before
    open_source(path).skeleton()  # imports transformers' model code (and scipy, OpenBLAS)
    # RLIMIT_AS counts address space, which glibc's heap keeps after a free (stream gives its
    # pages back, malloc_trim, but not the addresses): a fixed mmap threshold makes every
    # allocation of 256 KB or more a mapping of its own: address space follows resident memory
    ctypes.CDLL("libc.so.6").mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
    resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + budget, resource.RLIM_INFINITY))
    try:
        if how == "stream":
            stream.quantize(open_source(path), "int8-dynamic", out).finish()
        else:
            model, _, _ = edgequant.models.load(path)
            edgequant.save(edgequant.quantize(model, "int8-dynamic")[0], out)
    except (MemoryError, RuntimeError, ValueError) as e:  # how torch, safetensors and
        if not isinstance(e, MemoryError) and "allocate memory" not in str(e):  # edgequant
            raise  # report a failed allocation
        print(json.dumps({"failed": f"{type(e).__name__}: {str(e)[:200]}"}))
        sys.exit(0)
    print(json.dumps({"ok": True}))
    """
)


def test_under_a_memory_limit_below_the_float_size_only_streaming_works(tmp_path):
    # 16 layers of hidden 768 / ffn 2048: 110 M weights, 440 MB in float32, 28 MB a layer;
    # bf16 shards of 40 MB
    folder = _hf_folder(tmp_path / "model", hidden=768, ffn=2048, layers=16, vocab=4096,
                        dtype=torch.bfloat16, shard="40MB")  # fmt: skip
    float_bytes = 4 * open_source(folder).n_weights()
    assert float_bytes > 400e6
    budget = int(0.6 * float_bytes)  # address space the run may add: below the float model

    def child(how: str, out) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), str(out), how, str(budget)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert child("stream", tmp_path / "st") == {"ok": True}
    failed = child("memory", tmp_path / "mem")
    assert "failed" in failed, failed  # the limit bites
    model, _, _ = edgequant.models.load(folder)
    edgequant.save(edgequant.quantize(model, "int8-dynamic")[0], tmp_path / "mem")
    assert _digest(tmp_path / "st/model.safetensors") == _digest(tmp_path / "mem/model.safetensors")


def test_a_streamed_run_refuses_gptaq_head(tiny_folder, tmp_path):
    recipe = with_algorithm(edgequant.recipes.get("8da4w"), "gptq", gptaq=0.25, gptaq_head=1.0)
    with pytest.raises(ValueError, match=(
        r"^gptaq_head \(lm_head and others\) fits the float head to the rounded "
        r"model, which a streamed run does not do yet: quantize in memory \(--no-stream\) or "
        r"drop gptaq_head$"
    )):  # fmt: skip
        stream.quantize(open_source(tiny_folder), recipe, tmp_path / "s", calibration=_batches())
    assert not (tmp_path / "s").exists()


def test_a_stopped_gptaq_run_resumes_to_the_in_memory_bundle(tiny_folder, tmp_path):
    # GPTAQ carries the float model's calibration hidden states across the stop too
    recipe = with_algorithm(edgequant.recipes.get("8da4w"), "gptq", gptaq=0.25)
    windows = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    _in_memory(tiny_folder, recipe, tmp_path / "mem", _batches(), windows)
    out = tmp_path / "stopped"
    with pytest.raises(stream.Stopped, match="stopped after layer 0"):
        stream.quantize(open_source(tiny_folder), recipe, out, calibration=_batches(),
                        windows=windows, stop_after=0)  # fmt: skip
    stream.quantize(open_source(tiny_folder), recipe, out, calibration=_batches(),
                    windows=windows, resume=True)  # fmt: skip
    assert _digest(out / "model.safetensors") == _digest(tmp_path / "mem/model.safetensors")
    plain = with_algorithm(edgequant.recipes.get("8da4w"), "gptq")
    _in_memory(tiny_folder, plain, tmp_path / "plain", _batches(), windows)
    assert _digest(tmp_path / "plain/model.safetensors") != _digest(out / "model.safetensors")
