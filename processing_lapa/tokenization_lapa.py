"""A tiny byte-level tokenizer built in code, for tests and CPU runs where no backbone tokenizer is downloaded.

Every byte is one token (no merges), so any text round-trips and the vocabulary is fixed: ids 0-4 are the special
tokens below, id 5 + b is byte b. Real runs use their backbone's tokenizer instead; the processor treats both the
same way.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def _byte_symbols() -> list[str]:
    """The printable character that stands for each byte value 0..255 in byte-level vocabularies.

    Byte-level pre-tokenisation replaces every byte with a visible character (printable Latin-1 bytes map to
    themselves, the others to code points from 256 upward, in byte order), so vocabulary entries are never control
    characters or whitespace.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    symbols, next_free = [], 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_free))
            next_free += 1
    return symbols


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    r"""Build the byte-level tokenizer: 261 tokens, deterministic ids.

    Returns:
        [`PreTrainedTokenizerFast`] with `bos_token="<s>"` (id 1), `eos_token="</s>"` (id 2), `pad_token="<pad>"`
        (id 3), `unk_token="<unk>"` (id 0) and the image placeholder `<image>` (id 4, also `tokenizer.image_token`).
        It adds no special tokens by itself when encoding: the LAPA processor places BOS where it belongs.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # No regex split and no prefix space: the text maps to its bytes one to one.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def llama_tokenizer_from_sentencepiece(model_file, pad_token: str = "<unk>"):
    r"""LLaMA's tokenizer (transformers' `LlamaTokenizer`, a `tokenizers` BPE with byte fallback) from a SentencePiece
    `tokenizer.model`, read with the `sentencepiece` package (transformers' own reader needs `protobuf` as well).

    The vocabulary and merges are the model's pieces in id order (merges derived from the vocabulary, as
    transformers does for SentencePiece BPE models); encoding a text with `add_special_tokens=False` gives
    `sentencepiece.encode(text)` for models trained like LLaMA's (identity normaliser, no whitespace folding, a
    leading "▁"). `pad_token` defaults to `<unk>` (id 0), the id LAPA's authors pad with (LLaMA has no pad token).
    """
    try:
        import sentencepiece
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading a SentencePiece tokenizer.model needs `pip install sentencepiece`") from err
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    if len(vocab) != processor.get_piece_size():
        raise ValueError(f"{model_file}: duplicate pieces in the SentencePiece model")
    special = {name: processor.id_to_piece(i) for name, i in
               (("unk_token", processor.unk_id()), ("bos_token", processor.bos_id()), ("eos_token", processor.eos_id()))
               if i >= 0}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=False, add_eos_token=False,
                               **special)
    tokenizer.pad_token = pad_token
    tokenizer.padding_side = "left"
    return tokenizer
