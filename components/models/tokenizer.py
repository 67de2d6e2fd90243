"""A BERT WordPiece vocabulary trained on our own titles and queries (when no checkpoint is given).

The tokenizers library's WordPiece trainer (BPE merges, then greedy longest-match tokenisation)
gives the `##` continuation pieces their ids in hash-map order, and those ids break ties between
equally frequent merges, so two trainings on the same texts can yield different vocabularies
(huggingface/tokenizers#1794). We therefore hand the trainer every `##c` piece of the corpus'
alphabet up front, in sorted order: ids, ties and so the vocabulary are then the same every run.
The result is wrapped as a standard `BertTokenizerFast` (BERT's normaliser with lowercasing and
accent stripping, BERT's pre-tokeniser, `[CLS] text [SEP]`), saved and loaded with
`save_pretrained` / `from_pretrained` beside the model.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, in this order
CONTINUATION = "##"


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> BertTokenizerFast:
    """A lowercasing BERT WordPiece tokenizer with at most `vocab_size` tokens; deterministic.

    The vocabulary is smaller than `vocab_size` when the texts hold fewer merges (a synthetic
    catalogue's whole words fit in about a thousand tokens).
    """
    texts = list(texts)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    continuing: set[str] = set()
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            continuing.update(word[1:])
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *(CONTINUATION + c for c in sorted(continuing))],
        continuing_subword_prefix=CONTINUATION,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Rebuilt from the vocabulary alone: the `##c` pieces were "special" only for the trainer.
    return BertTokenizerFast(vocab=tokenizer.get_vocab(), do_lower_case=True)
