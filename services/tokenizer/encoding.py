"""Loading a model's HF fast tokenizer and answering Tokenize requests (TGIS encoding semantics)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from services.common.protocol import Tokenize, TokenizedText, TokenizeResult, token_ids

NO_FAST_TOKENIZER = "No existing fast tokenizer (tokenizer.json) found"


class TokenizerNotFoundError(Exception):
    """The model folder has no tokenizer.json and transformers cannot build a fast tokenizer from it."""


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model's fast tokenizer, with truncation and padding turned off (as TGIS uses it)."""
    path = Path(model_dir) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path)) if path.is_file() else _converted_tokenizer(Path(model_dir))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _converted_tokenizer(model_dir: Path) -> Tokenizer:
    """The fast tokenizer transformers builds from other tokenizer files (e.g. a sentencepiece model)."""
    # Imported here: transformers is slow to import and only needed for models without tokenizer.json.
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise TokenizerNotFoundError(NO_FAST_TOKENIZER) from exc
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TokenizerNotFoundError(NO_FAST_TOKENIZER)
    return backend


def is_encoder_decoder(model_dir: Path) -> bool:
    """Whether the model's config.json declares an encoder-decoder (seq2seq) model."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("is_encoder_decoder", False))


def tokenize(tokenizer: Tokenizer, request: Tokenize) -> TokenizeResult:
    """Encode each text with special tokens added; tokens and char offsets only when asked for."""
    try:
        encodings = tokenizer.encode_batch(list(request.texts), add_special_tokens=True)
    except Exception as exc:  # any tokenizer failure is the request's error, not the process's
        return TokenizeResult(request.job_id, [], error=str(exc) or type(exc).__name__)
    return TokenizeResult(
        request.job_id,
        [
            TokenizedText(
                ids=token_ids(encoding.ids),
                tokens=list(encoding.tokens) if request.return_tokens else [],
                offsets=[tuple(offset) for offset in encoding.offsets] if request.return_offsets else [],
            )
            for encoding in encodings
        ],
    )
