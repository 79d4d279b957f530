"""`HFTokenizer`: a transformers tokenizer behind edgequant's small tokenizer interface.

Built from a GGUF file's metadata (transformers converts it; no download) or from a folder
holding ``tokenizer.json``; saved as transformers' own JSON files.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class HFTokenizer:
    """``encode`` / ``decode`` / ``chat_prompt`` over a transformers tokenizer."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.bos_id: int | None = tok.bos_token_id
        self.eos_id: int | None = tok.eos_token_id

    @classmethod
    def from_gguf(cls, path: str | Path) -> HFTokenizer:
        from transformers import AutoTokenizer

        path = Path(path)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return cls(tok)

    @classmethod
    def load(cls, folder: str | Path) -> HFTokenizer:
        """From a folder with ``tokenizer.json`` (local files only)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} has no tokenizer.json; edgequant needs the tokenizer beside the "
                "weights (a Hugging Face fast tokenizer file)"
            )
        return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))

    def save(self, folder: str | Path) -> list[str]:
        """Write the tokenizer's JSON files into ``folder``; returns the file names."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save_pretrained(str(folder))
        return sorted(p.name for p in folder.iterdir() if p.is_file())

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS/EOS only when asked for and the tokenizer has them."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, user_text: str) -> str | None:
        """The chat template applied to one user message, ready for the answer; or None."""
        if not getattr(self.tok, "chat_template", None):
            return None
        return self.tok.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
