"""The shards' token ids must come from the text encoder's vocabulary (checked by the manifest's hash)."""

from __future__ import annotations

from pathlib import Path

from transrec.data_shards.tokenizer import default_tokenizer_path, vocab_hash_of


def tokenizer_dir(text_encoder: str) -> str:
    # The random-init BERT-base shape uses the BERT uncased vocabulary, which all-MiniLM-L6-v2 shares.
    return text_encoder if Path(text_encoder).is_dir() else default_tokenizer_path()


def check_vocabulary(manifest: dict, text_encoder: str) -> None:
    wanted = vocab_hash_of(tokenizer_dir(text_encoder))
    have = manifest["text"]["tokenizer"]["vocab_hash"]
    if wanted != have:
        raise ValueError(
            f"the shards were tokenized with another vocabulary (hash {have[:12]}) than the text encoder "
            f"{text_encoder!r} (hash {wanted[:12]}): rebuild them with `python -m transrec.data_shards.build ... "
            f"--tokenizer {tokenizer_dir(text_encoder)}`"
        )
