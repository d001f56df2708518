"""Data: the grain pipeline with packing, its sources (stdlib corpus, TFDS, text, JSONL,
parquet, Arrow, mixtures) and the tokenizers.

Modules: columnar_source, corpus, data, gguf_tokenizer, source_spec, stdlib_dataset, text_source,
tokenizer.
"""

__all__ = [
    'columnar_source',
    'corpus',
    'data',
    'gguf_tokenizer',
    'source_spec',
    'stdlib_dataset',
    'text_source',
    'tokenizer',
]
