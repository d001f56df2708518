"""Data: the grain pipeline with packing, its sources (stdlib corpus, TFDS, text, JSONL,
parquet, Arrow, mixtures) and the tokenizers. The tokenizers need no grain: importing this
package, or `tokenizer`, pulls in none of the pipeline's packages.

Modules: columnar_source, corpus, data, gguf_tokenizer, source_spec, stdlib_dataset, text_source,
tokenizer.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "data": ("DataConfig", "make_iterator", "validation_batches"),
    "tokenizer": ("load_tokenizer", "ByteTokenizer", "train_bpe_tokenizer"),
    "corpus": ("stdlib_files",),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
