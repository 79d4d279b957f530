"""save / load: identical outputs, manifest contents, size formula, refusals of bad bundles."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import edgequant
from edgequant.artifact import MANIFEST, TENSORS, read_manifest

STORIES_8DA4W = "examples/stories260k-8da4w.yaml"


@pytest.fixture
def bundle(fresh_stories260k, story_ids, tmp_path):
    model, _ = fresh_stories260k()
    model, plan = edgequant.quantize(model, STORIES_8DA4W)
    with torch.no_grad():
        logits = model(story_ids)
    path = edgequant.save(model, tmp_path / "bundle")
    return path, logits, plan


def test_load_rebuilds_identical_outputs(bundle, story_ids):
    path, logits, _ = bundle
    model = edgequant.load(path)
    with torch.no_grad():
        assert torch.equal(model(story_ids), logits)
    assert model.output.qweight is model.tok_embeddings.qweight  # still tied after loading
    assert model.edgequant_recipe.name == "stories260k-8da4w"


def test_load_into_a_given_skeleton(bundle, fresh_stories260k, story_ids):
    path, logits, _ = bundle
    skeleton, _ = fresh_stories260k()
    model = edgequant.load(path, model=skeleton)
    with torch.no_grad():
        assert torch.equal(model(story_ids), logits)


def test_load_into_a_shallow_copy_leaves_its_source(fresh_stories260k, story_ids, tmp_path):
    # smoothing changes the norms the bundle stores: loading them into a copy that shares the
    # float model's tensors must replace the copy's tensors, not write into the float model's
    from edgequant._modules import shallow_copy

    model, _ = fresh_stories260k()
    source, _ = fresh_stories260k()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    quantized, _ = edgequant.quantize(model, STORIES_8DA4W)
    quantized.layers[0].attention_norm.weight.data.mul_(2.0)  # as smoothing would
    with torch.no_grad():
        logits = quantized(story_ids)
    path = edgequant.save(quantized, tmp_path / "bundle")
    reloaded = edgequant.load(path, model=shallow_copy(source))
    with torch.no_grad():
        assert torch.equal(reloaded(story_ids), logits)
    after = source.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert reloaded.layers[0].attention_norm.weight.data_ptr() != (
        source.layers[0].attention_norm.weight.data_ptr()
    )


def test_manifest_records_what_made_the_bundle(bundle):
    path, _, plan = bundle
    manifest = read_manifest(path)
    assert manifest["format"] == "edgequant.bundle" and manifest["format_version"] == 1
    assert manifest["edgequant_version"] == edgequant.__version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["model"]["family"] == "llama2c"
    assert manifest["model"]["config"]["dim"] == 64
    assert manifest["recipe"] == plan.recipe.to_dict()
    assert manifest["layers"]["layers.0.feed_forward.w2"]["scheme"]["group_size"] == 86
    assert manifest["aliases"] == {
        "output.qweight": "tok_embeddings.qweight",
        "output.scale": "tok_embeddings.scale",
    }
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, TENSORS]


def test_8da4w_bytes_match_the_formula(bundle):
    """Quantized weights + fp16 scales = params * (4 + 16 / group) / 8, within 2%."""
    path, _, plan = bundle
    stored = 0
    params = expected = 0.0
    with safe_open(str(path / TENSORS), "pt") as f:
        for lp in plan:
            if lp.tied_to:
                continue
            group = lp.scheme.group_size
            n = lp.shape[0] * lp.shape[1]
            params += n
            expected += n * (4 + 16 / group) / 8
            for buf in ("qweight", "scale"):
                t = f.get_tensor(f"{lp.fqn}.{buf}")
                stored += t.numel() * t.element_size()
    assert abs(stored - expected) / expected < 0.02
    assert stored == plan.bytes_after
    # the whole model: g32 everywhere would be exactly 4.5 bits per weight; the five w2 (g86) less
    assert 4.18 < stored * 8 / params < 4.5


def test_save_refuses_to_overwrite(bundle, fresh_stories260k):
    path, _, _ = bundle
    model, _ = fresh_stories260k()
    with pytest.raises(
        FileExistsError, match=re.escape(f"{str(path)!r} exists; pass overwrite=True")
    ):
        edgequant.save(model, path)
    edgequant.save(model, path, overwrite=True)
    assert read_manifest(path)["layers"] == {}  # the float model replaced the quantized one
    assert sorted(p.name for p in path.parent.iterdir()) == ["bundle"]  # no temporary left


def test_missing_bundle_and_missing_files(bundle, tmp_path):
    path, _, _ = bundle
    with pytest.raises(FileNotFoundError, match="bundle folder .*nowhere.* does not exist"):
        edgequant.load(tmp_path / "nowhere")
    (path / TENSORS).unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{str(path / TENSORS)!r} is missing from the bundle")
    ):
        edgequant.load(path)
    (path / MANIFEST).unlink()
    with pytest.raises(
        FileNotFoundError, match="manifest.json' is missing: not an edgequant bundle"
    ):
        edgequant.load(path)


def test_truncated_file_is_refused_by_name(bundle):
    path, _, _ = bundle
    data = (path / TENSORS).read_bytes()
    (path / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{str(path / TENSORS)!r} is truncated or altered: {len(data) // 2} bytes, "
            f"the manifest says {len(data)}"
        ),
    ):
        edgequant.load(path)


def test_altered_file_is_refused_by_name(bundle):
    path, _, _ = bundle
    data = bytearray((path / TENSORS).read_bytes())
    data[-10] ^= 0xFF
    (path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=re.escape(f"{str(path / TENSORS)!r} is corrupted or altered: sha256 ")
    ):
        edgequant.load(path)


def test_corrupted_manifest_is_refused(bundle):
    path, _, _ = bundle
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json' is corrupted"):
        edgequant.load(path)
    (path / MANIFEST).write_text(json.dumps({"format": "edgequant.bundle", "format_version": 7}))
    with pytest.raises(ValueError, match="format_version 7 is not supported"):
        edgequant.load(path)


def test_unknown_family_needs_a_skeleton(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    model, _ = edgequant.quantize(model, "int8-dynamic")
    path = edgequant.save(model, tmp_path / "b")
    with pytest.raises(ValueError, match="does not record a model family edgequant can build"):
        edgequant.load(path)
    skeleton = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    loaded = edgequant.load(path, model=skeleton)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


def test_overwrite_never_replaces_something_that_is_not_a_bundle(fresh_stories260k, tmp_path):
    model, _ = fresh_stories260k()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not an edgequant bundle; refusing"):
        edgequant.save(model, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not an edgequant bundle"):
        edgequant.save(model, a_file, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes"]


def test_bundle_files_get_the_usual_permissions(bundle):
    import os

    path, _, _ = bundle
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (path / TENSORS).stat().st_mode & 0o777 == 0o666 & ~mask


def test_manifest_without_its_tables_is_refused(bundle):
    path, _, _ = bundle
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["files"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=re.escape("is corrupted: ['files'] missing or not mappings")
    ):
        edgequant.load(path)


def test_an_unlisted_file_in_the_tokenizer_folder_is_refused(fresh_stories260k, tmp_path):
    from edgequant.artifact import load_tokenizer

    model, tokenizer = fresh_stories260k()
    path = edgequant.save(model, tmp_path / "b", tokenizer=tokenizer)
    assert load_tokenizer(path).encode("Once", bos=True)[0] == 1
    (path / "tokenizer" / "special_tokens_map.json").write_text("{}")
    with pytest.raises(
        ValueError,
        match=re.escape("holds file(s) the manifest does not list: ['special_tokens_map.json']"),
    ):
        load_tokenizer(path)


def _edit_manifest(path, change):
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "name",
    ["../outside.bin", "/etc/hostname", "tokenizer/../../outside.bin", "sub/model.safetensors",
     "tokenizer/a/b", "tokenizer\\..\\x", "", "./model.safetensors", "tokenizer/"],
)  # fmt: skip
def test_manifest_files_outside_the_bundle_are_refused_before_reading(bundle, tmp_path, name):
    # a file outside the folder is neither read nor reported: the error is the same whether
    # the path exists or not
    path, _, _ = bundle
    (tmp_path / "outside.bin").write_bytes(b"secret")
    entry = {"bytes": 6, "sha256": "0" * 64}
    _edit_manifest(path, lambda m: m["files"].__setitem__(name, entry))
    with pytest.raises(ValueError, match=re.escape(f"files[{name!r}]: a bundle lists only")):
        read_manifest(path)


def test_manifest_file_facts_are_validated_by_field(bundle):
    path, _, _ = bundle
    _edit_manifest(path, lambda m: m["files"][TENSORS].__setitem__("bytes", -1))
    with pytest.raises(
        ValueError, match=re.escape("files['model.safetensors'].bytes: must be a whole number")
    ):
        read_manifest(path)
    _edit_manifest(path, lambda m: m["files"][TENSORS].update(bytes=1, sha256="../x"))
    with pytest.raises(ValueError, match=re.escape(".sha256: must be 64 lowercase hex digits")):
        read_manifest(path)
    _edit_manifest(path, lambda m: m["files"].pop(TENSORS))
    with pytest.raises(ValueError, match="files does not list 'model.safetensors'"):
        read_manifest(path)


def test_a_symlinked_bundle_file_is_refused(fresh_stories260k, tmp_path):
    model, tokenizer = fresh_stories260k()
    path = edgequant.save(model, tmp_path / "b", tokenizer=tokenizer)
    (tmp_path / "elsewhere").mkdir()
    file = next((path / "tokenizer").iterdir())
    moved = tmp_path / "elsewhere" / file.name
    file.rename(moved)
    file.symlink_to(moved)  # same bytes, same hash: still refused
    with pytest.raises(ValueError, match="is a symbolic link; a bundle holds its own files"):
        read_manifest(path)


def test_the_tokenizer_reads_only_listed_files(fresh_stories260k, tmp_path):
    from edgequant.artifact import load_tokenizer

    model, tokenizer = fresh_stories260k()
    path = edgequant.save(model, tmp_path / "b", tokenizer=tokenizer)
    _edit_manifest(path, lambda m: m["tokenizer"].__setitem__("files", ["../../etc/hostname"]))
    with pytest.raises(ValueError, match="tokenizer must be .*listed under files"):
        load_tokenizer(path)
    _edit_manifest(path, lambda m: m.__setitem__("tokenizer", "hf"))
    with pytest.raises(ValueError, match="tokenizer must be"):
        load_tokenizer(path)


def test_overwrite_refuses_a_bundle_folder_holding_other_files(bundle, fresh_stories260k):
    # a folder that claims to be a bundle (or is one, with a user's file added) keeps its files
    path, _, _ = bundle
    (path / "report.json").write_text("{}")  # the main job's: replaceable
    (path / "notes.txt").write_text("mine")
    (path / "data").mkdir()
    model, _ = fresh_stories260k()
    with pytest.raises(
        FileExistsError,
        match=re.escape("holds file(s) edgequant did not write: ['data', 'notes.txt']; "),
    ):
        edgequant.save(model, path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    (path / "notes.txt").unlink()
    (path / "data").rmdir()
    edgequant.save(model, path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, TENSORS]


def test_an_edited_config_asking_for_a_huge_model_is_refused_before_allocating(bundle):
    path, _, _ = bundle
    _edit_manifest(path, lambda m: m["model"]["config"].update(dim=2**16, hidden_dim=2**18))
    with pytest.raises(
        ValueError, match=r"model.config describes \d+\.\d GB of float weights, which model"
    ):
        edgequant.load(path)


def test_a_tied_float_head_stays_tied_after_loading(tmp_path):
    # a skeleton whose head and embedding are one Parameter keeps them one (exporters read the
    # tie from the object: GGUF writes no output.weight for a tied head)
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(16, 8), "head": nn.Linear(8, 16, bias=False)})
    model.head.weight = model.emb.weight
    path = edgequant.save(model, tmp_path / "b")
    skeleton = nn.ModuleDict({"emb": nn.Embedding(16, 8), "head": nn.Linear(8, 16, bias=False)})
    skeleton.head.weight = skeleton.emb.weight
    loaded = edgequant.load(path, model=skeleton)
    assert loaded.head.weight is loaded.emb.weight
    assert torch.equal(loaded.emb.weight, model.emb.weight)
