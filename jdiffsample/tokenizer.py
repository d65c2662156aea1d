"""CLIP's byte-level BPE tokenizer, read from a diffusers ``tokenizer/`` folder (no JAX needed).

Gives the ids transformers' ``CLIPTokenizer`` gives for the same folder (its ``tokenizers``
pipeline, rebuilt here with the ``tokenizers`` package), padded and truncated as the Stable
Diffusion pipelines ask for (``padding="max_length", truncation=True``)::

    tokenizer = CLIPTokenizer.from_folder("stable-diffusion-v1-5/tokenizer")
    ids = tokenizer(["a photo of a cat", ""])          # int32 [2, model_max_length]

The pipeline: NFC, runs of whitespace -> one space, lower case; split into words, single
digits, runs of other symbols and the contractions ``'s 't 're 've 'm 'll 'd`` (CLIP's regex); bytes
mapped to printable characters; BPE with ``</w>`` marking a word's end; ``<|startoftext|>`` first,
``<|endoftext|>`` last. Special tokens (start, end, pad, unknown, and any added token of the
folder) are matched in the text first, with the flags the folder gives them (SD 2.x's pad token
``!`` is special too, as in transformers).

Files: ``vocab.json`` + ``merges.txt`` or ``tokenizer.json`` (its vocabulary and merges); the
special tokens and ``model_max_length`` from ``tokenizer_config.json`` (or ``special_tokens_map.json``,
``tokenizer.json``'s added tokens, as transformers reads them). Longer prompts are truncated to
``model_max_length`` (the end token kept) with a :func:`warnings.warn` naming the removed text,
as diffusers does; shorter ones padded with the folder's pad token (SD 1.x: ``<|endoftext|>``,
SD 2.x and SDXL's second tokenizer: ``!``, id 0).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
)
from tokenizers.models import BPE

__all__ = ["CLIPTokenizer", "FILES", "fixed_length"]

#: The files of a tokenizer folder that :meth:`CLIPTokenizer.from_folder` reads (those present).
FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
            r"[^\s\p{L}\p{N}]+")
_SUFFIX = "</w>"
_DEFAULTS = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                 pad_token="<|endoftext|>")
_NAMED = tuple(_DEFAULTS)
_DEFAULT_MAX_LENGTH = 77  # CLIP's context length, when the folder names none
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None


def _added_token(value: Any, special: bool) -> AddedToken:
    """An ``AddedToken`` from a config value: a string (not normalized) or a dict of flags."""
    if isinstance(value, str):
        return AddedToken(value, normalized=False, special=special)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in _FLAGS if k in value}
        flags["special"] = special or flags.get("special", False)
        return AddedToken(value["content"], **flags)
    raise ValueError(f"not a token: {value!r}")


def fixed_length(ids: Sequence[list[int]], length: int, pad_id: int, end_id: int) -> tuple[np.ndarray, list]:
    """int32 ``[B, length]`` rows of ``ids`` (each ending with ``end_id``), padded with ``pad_id``;
    a longer row keeps its first ``length - 1`` ids and its end. Also returns, for each cut row, the
    ids removed (the end id excepted), for the caller's truncation warning."""
    out = np.full((len(ids), length), pad_id, np.int32)
    removed = []
    for row, seq in enumerate(ids):
        if len(seq) > length:
            removed.append(seq[length - 1:-1])
            seq = [*seq[:length - 1], end_id]
        out[row, :len(seq)] = seq
    return out, removed


class CLIPTokenizer:
    """Prompts -> padded CLIP token ids; build it with :meth:`from_folder`.

    Attributes: ``model_max_length``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id``
    and the token strings ``bos_token``, ``eos_token``, ``pad_token``.
    """

    def __init__(self, backend: Tokenizer, *, bos_token: str, eos_token: str, pad_token: str,
                 model_max_length: int = _DEFAULT_MAX_LENGTH):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        ids = {}
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            ids[name] = backend.token_to_id(token)
            if ids[name] is None:
                raise ValueError(f"CLIPTokenizer: the {name} {token!r} is not in the vocabulary")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
        if model_max_length < 2:
            raise ValueError(f"CLIPTokenizer: model_max_length must be >= 2, got {model_max_length}")
        self.model_max_length = int(model_max_length)

    @classmethod
    def from_folder(cls, folder) -> CLIPTokenizer:
        """The tokenizer of a diffusers ``tokenizer/`` folder (see the module docstring);
        ``ValueError`` when its files are missing or unreadable."""
        folder = Path(folder)
        vocab_file, merges_file, json_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{folder}/tokenizer_config.json does not hold a JSON object")
        added: dict[int, Any] = {}
        if vocab_file.is_file() and merges_file.is_file():
            try:
                vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
            except Exception as err:  # the Rust reader raises plain Exceptions
                raise ValueError(f"{folder}: vocab.json / merges.txt are not a BPE vocabulary ({err})") from None
        elif json_file.is_file():
            model = _read_json(json_file).get("model", {})
            if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
                raise ValueError(f"{json_file}: not a BPE tokenizer")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        else:
            raise ValueError(f"{folder}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json)")

        # Special tokens as transformers reads them: tokenizer_config's added_tokens_decoder, else the
        # legacy special_tokens_map.json and tokenizer.json's added tokens.
        named = {k: config.get(k, default) for k, default in _DEFAULTS.items()}
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, Mapping):
            added = {int(i): t for i, t in decoder.items()}
        else:
            if (folder / "special_tokens_map.json").is_file():
                special_map = _read_json(folder / "special_tokens_map.json")
                named.update({k: v for k, v in special_map.items() if k in _NAMED and v})
            if json_file.is_file():
                added = {int(t["id"]): t for t in _read_json(json_file).get("added_tokens", [])}
        try:
            tokens = [_added_token(t, False) for _, t in sorted(added.items())]
            by_content = {t.content: t for t in tokens}
            for key in _NAMED:
                value = named[key]
                token = by_content.get(value if isinstance(value, str) else
                                       value.get("content") if isinstance(value, Mapping) else None)
                if token is None:
                    token = _added_token(value, True)
                    tokens.append(token)
                    by_content[token.content] = token
                named[key] = token.content
        except ValueError as err:
            raise ValueError(f"{folder}: bad special token in the tokenizer config ({err})") from None
        missing = [t.content for t in tokens if t.content not in vocab]
        if missing:
            raise ValueError(f"{folder}: special tokens {missing} are not in the vocabulary")

        backend = Tokenizer(BPE(vocab, merges, unk_token=named["unk_token"], continuing_subword_prefix="",
                                end_of_word_suffix=_SUFFIX, fuse_unk=False))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens(tokens)
        max_length = config.get("model_max_length", _DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or max_length > 10**6:  # transformers' "no limit" marker
            max_length = _DEFAULT_MAX_LENGTH
        return cls(backend, bos_token=named["bos_token"], eos_token=named["eos_token"],
                   pad_token=named["pad_token"], model_max_length=max_length)

    def encode(self, prompt: str) -> list[int]:
        """The ids of one prompt, ``<|startoftext|>`` ... ``<|endoftext|>``, neither truncated nor padded."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        return [self.bos_token_id, *self.backend.encode(prompt, add_special_tokens=False).ids, self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens included), words separated by single spaces."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False).replace(_SUFFIX, " ").strip()

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """int32 ``[B, max_length]`` (default ``model_max_length``) ids of ``prompts`` (one string or a
        list), truncated with a warning and padded with the pad token."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.model_max_length if max_length is None else int(max_length)
        if length < 2:
            raise ValueError(f"max_length must be >= 2, got {length}")
        out, removed = fixed_length([self.encode(p) for p in prompts], length, self.pad_token_id, self.eos_token_id)
        for ids in removed:
            warnings.warn(f"The following part of your input was truncated because CLIP can only handle "
                          f"sequences up to {length} tokens: {self.decode(ids)!r}", stacklevel=2)
        return out
