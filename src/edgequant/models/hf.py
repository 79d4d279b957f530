"""Load a Hugging Face model folder (``config.json`` + safetensors + tokenizer), locally only.

transformers is the model definition; weights are read from safetensors only. A folder that
holds nothing but pickle checkpoints (``pytorch_model.bin``, ``*.pt``) is refused: unpickling
runs arbitrary code.
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_pickle(path: Path) -> bool:
    """A torch.save / pickle file: pickle protocol >= 2 starts with 0x80, torch's zip with PK."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or head == b"PK"


def refuse_pickle(what: str) -> ValueError:
    return ValueError(
        f"{what}; edgequant never unpickles model files, since loading them can run arbitrary "
        "code. Convert them to safetensors where you trust the file (e.g. transformers' "
        "model.save_pretrained(out, safe_serialization=True)) and load that folder"
    )


def check_folder(folder: Path) -> None:
    """Refuse a folder without safetensors weights or without a config, saying why."""
    has_weights = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_weights and pickles and any(is_pickle(folder / n) for n in pickles):
        raise refuse_pickle(f"{str(folder)!r} holds only pickle checkpoints ({', '.join(pickles)})")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no config.json: not a Hugging Face model folder"
        )
    if has_weights:
        return
    if pickles:
        raise refuse_pickle(f"{str(folder)!r} holds only pickle checkpoints ({', '.join(pickles)})")
    raise FileNotFoundError(f"{str(folder)!r} has no weights (*.safetensors)")


def load(folder: str | Path):
    """``(model, tokenizer, info)`` for a local Hugging Face causal-LM folder, float32, eval."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgequant.models.tokenizer import HFTokenizer

    folder = Path(folder)
    check_folder(folder)
    tokenizer = HFTokenizer.load(folder)
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, dtype=torch.float32,
            output_loading_info=True,
        )  # fmt: skip
    except MemoryError:  # not a damaged file: the machine's (or the process's) memory
        raise
    except Exception as e:  # transformers and safetensors raise many types on damaged files
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"{str(folder)!r}: the model cannot be loaded ({type(e).__name__}: {reason})"
        ) from None
    # transformers initialises what the files lack at random and only warns: refuse instead
    wrong = {
        "missing": loading.get("missing_keys") or [],
        "of another shape": [k[0] if isinstance(k, tuple) else k
                             for k in loading.get("mismatched_keys") or []],
    }  # fmt: skip
    wrong = {what: sorted(keys) for what, keys in wrong.items() if keys}
    if wrong:
        raise ValueError(
            f"{str(folder)!r}: the weights do not fit config.json: "
            + "; ".join(f"{what}: {keys[:4]}{' ...' if len(keys) > 4 else ''}"
                        for what, keys in wrong.items())
        )  # fmt: skip
    model.eval()
    info = {"family": "hf", "format": "hf", "source": str(folder), "config": model.config.to_dict()}
    return model, tokenizer, info


def build(config: dict, meta: bool = False):
    """An un-trained model of the architecture ``config`` describes (for `edgequant.load`);
    with ``meta`` its parameters take no memory (`edgequant.models.gguf.skeleton`) and are
    assigned next."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    if meta:
        from edgequant.models.gguf import skeleton

        return skeleton(hf_config)
    return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
