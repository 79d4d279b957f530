"""Seeded fuzzing of the readers of untrusted files: recipes, bundle manifests and GGUF files.
Every mutated input must load or end in one of edgequant's user errors with a message (what the
CLI prints as ``edgequant <verb>: error: ...``), never another exception, a crash or a hang."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import edgequant
from edgequant.recipe import Recipe

# what the CLI prints as one error line; a TypeError must also name where (a wrong type in
# a named field), so that an internal "unhashable type" does not pass for one
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError)
CASES = 300  # per reader; 1000 each passed once (15 s), CI keeps it short

RECIPE = """name: fuzz
rules:
  - role: attention
    layers: [0, 1]
    scheme: {weight: int8, granularity: per_channel, activation: int8_dynamic}
  - role: default
    scheme: {weight: int4, granularity: per_group, group_size: 32, scale_dtype: fp16,
             algorithm: hqq, algorithm_params: {iters: 5, p: 0.7}}
  - module: output
    scheme: {weight: fp16}
"""

ODD_VALUES = [None, -1, 0, 2**63, 1e308, float("nan"), "", "../x", [], {}, [[[]]], True,
              {"a": {"b": {}}}, "int4", 3.5]  # fmt: skip


def _mutate_bytes(data: bytes, rng: random.Random, span: int | None = None) -> bytes:
    """Flip, insert, delete or overwrite a few bytes (within the first ``span`` bytes)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        limit = min(len(out), span or len(out))
        i = rng.randrange(max(limit, 1))
        action = rng.choice(["flip", "insert", "delete", "overwrite", "u64"])
        if action == "flip" and out:
            out[i] ^= 1 << rng.randrange(8)
        elif action == "insert":
            out[i:i] = rng.randbytes(rng.randint(1, 8))
        elif action == "delete":
            del out[i : i + rng.randint(1, 8)]
        elif action == "overwrite":
            out[i : i + 1] = bytes([rng.randrange(256)])
        else:  # a count or length field turned absurd
            out[i : i + 8] = rng.choice([2**63 - 1, 2**40, 0, 2**32 + 1]).to_bytes(8, "little")
    return bytes(out)


def _mutate_tree(data, rng: random.Random):
    """Replace one randomly chosen value of a JSON-like tree with an odd one."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(data, ())
    path = rng.choice(paths[1:])
    node = data
    for key in path[:-1]:
        node = node[key]
    if rng.random() < 0.2 and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = rng.choice(ODD_VALUES)
    return data


def _expect_user_error_or_success(call, what: str, names: tuple[str, ...] = ()):
    try:
        call()
    except USER_ERRORS as e:
        assert str(e).strip(), f"{what}: {type(e).__name__} without a message"
        if isinstance(e, TypeError):
            assert any(n in str(e) for n in names), f"{what}: TypeError naming nothing: {e}"
    except Exception as e:  # noqa: BLE001  (the point of the test)
        pytest.fail(f"{what}: {type(e).__name__}: {e}")


def test_fuzzed_recipes(tmp_path):
    rng = random.Random(20261205)
    parsed = Recipe.from_yaml(RECIPE).to_dict()
    for case in range(CASES):
        if case % 2:
            text = _mutate_bytes(RECIPE.encode(), rng)
            path = tmp_path / f"r{case}.yaml"
            path.write_bytes(text)
        else:
            path = tmp_path / f"r{case}.json"
            path.write_text(json.dumps(_mutate_tree(json.loads(json.dumps(parsed)), rng)))
        _expect_user_error_or_success(
            lambda p=path: Recipe.load(p), f"recipe case {case}", (path.name,)
        )


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    from edgequant.models import load

    model, tokenizer, _ = load("stories260k")
    model, _ = edgequant.quantize(model, "examples/stories260k-8da4w.yaml")
    return edgequant.save(model, tmp_path_factory.mktemp("fuzz") / "bundle", tokenizer=tokenizer)


def test_fuzzed_manifests(small_bundle):
    import shutil

    from edgequant.artifact import MANIFEST, load_tokenizer

    rng = random.Random(7)
    original = (small_bundle / MANIFEST).read_bytes()
    manifest = json.loads(original)
    copy = small_bundle.parent / "copy"
    shutil.copytree(small_bundle, copy)
    try:
        for case in range(CASES):
            if case % 3 == 0:
                data = _mutate_bytes(original, rng)
            else:
                data = json.dumps(_mutate_tree(json.loads(json.dumps(manifest)), rng)).encode()
            (copy / MANIFEST).write_bytes(data)
            names = (MANIFEST, "manifest")
            _expect_user_error_or_success(
                lambda: edgequant.load(copy), f"manifest case {case}", names
            )
            _expect_user_error_or_success(
                lambda: load_tokenizer(copy), f"tokenizer case {case}", names
            )
    finally:
        shutil.rmtree(copy)


def test_fuzzed_gguf_files(tmp_path):
    import gguf

    from edgequant.models import gguf as eq_gguf

    source = tmp_path / "ok.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list(["a", "b", "c", "d"])
    writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = source.read_bytes()
    header = len(original) - (4 * 8 + 8) * 4  # mutate the header and tensor infos mostly
    rng = random.Random(11)

    def read(path):
        reader = eq_gguf.open_reader(path, tokenizer=True)
        eq_gguf.read_config(reader)

    for case in range(CASES):
        path = tmp_path / f"g{case}.gguf"
        path.write_bytes(_mutate_bytes(original, rng, span=header))
        _expect_user_error_or_success(lambda p=path: read(p), f"gguf case {case}")
