"""A tokenizer-pool process: tokenization, incremental detokenization and stop sequences."""
