"""llama2.c's ``tok*.bin`` tokenizer (`Tokenizer`): sentencepiece-compatible ids, byte fallback."""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path


class Tokenizer:
    """llama2.c's ``tok*.bin`` BPE tokenizer (sentencepiece-compatible ids, byte fallback).

    >>> from edgequant.data import stories260k_dir
    >>> tok = Tokenizer(stories260k_dir() / "tok512.bin")
    >>> tok.decode(tok.encode("Hi, Lily!"))
    'Hi, Lily!'
    """

    bos_id = 1
    eos_id = 2
    _BYTE_PIECE = re.compile(rb"<0x([0-9A-F]{2})>")

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"llama2.c tokenizer not found: {path}")
        raw = path.read_bytes()
        self.file_name, self._raw = path.name, raw  # for save(): the file as read
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        offset = 4  # skips max_token_length, which only sizes a C buffer
        while offset < len(raw):
            if offset + 8 > len(raw):
                raise ValueError(f"{path}: truncated token record at byte {offset} of {len(raw)}")
            score, n = struct.unpack_from("<fi", raw, offset)
            if n < 0 or offset + 8 + n > len(raw):
                raise ValueError(f"{path}: token of {n} bytes at byte {offset} overruns the file")
            self.pieces.append(raw[offset + 8 : offset + 8 + n])
            self.scores.append(score)
            offset += 8 + n
        self._ids = {piece: i for i, piece in reversed(list(enumerate(self.pieces)))}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def save(self, folder: str | Path) -> list[str]:
        """Write the ``tok*.bin`` file as read into ``folder``; returns its name (what
        `edgequant.artifact` stores in a bundle)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.file_name).write_bytes(self._raw)
        return [self.file_name]

    def chat_prompt(self, user_text: str) -> None:
        """Always ``None``: llama2.c models have no chat template (prompts are raw text)."""
        return None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """llama2.c ``encode``: dummy-prefix space, characters (or bytes), then best-score merges.

        Merges are applied as llama2.c does (highest score first, leftmost on ties), with a heap.
        """
        ids = [self._ids[b" "]] if text else []
        for char in text:
            encoded = char.encode("utf-8")
            if encoded in self._ids:
                ids.append(self._ids[encoded])
            else:  # byte fallback: <0x00> is id 3
                ids.extend(b + 3 for b in encoded)
        nxt, prv = list(range(1, len(ids) + 1)), list(range(-1, len(ids) - 1))
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            if i < 0 or nxt[i] >= len(ids):
                return
            j = nxt[i]
            merged = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[j]])
            if merged is not None:
                heapq.heappush(heap, (-self.scores[merged], i, j, ids[i], ids[j]))

        for i in range(len(ids) - 1):
            push(i)
        while heap:
            _, i, j, id_i, id_j = heapq.heappop(heap)
            if nxt[i] != j or ids[i] != id_i or ids[j] != id_j:
                continue  # stale: a neighbour merged since this pair was pushed
            ids[i] = self._ids[self.pieces[id_i] + self.pieces[id_j]]
            ids[j] = -1
            nxt[i] = nxt[j]
            if nxt[i] < len(ids):
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
        out = [t for t in ids if t >= 0]
        return [self.bos_id] * bos + out + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Concatenate pieces; ``<0xXX>`` become bytes, BOS/EOS vanish, and the dummy-prefix
        space after BOS (or at the start) is stripped, as llama2.c and sentencepiece do."""
        out, prev = [], self.bos_id
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} out of range [0, {self.vocab_size})")
            if t not in (self.bos_id, self.eos_id):
                piece = self.pieces[t]
                if prev == self.bos_id and piece.startswith(b" "):
                    piece = piece[1:]
                if m := self._BYTE_PIECE.fullmatch(piece):
                    piece = bytes([int(m.group(1), 16)])
                out.append(piece)
            prev = t
        return b"".join(out).decode("utf-8", errors="replace")
