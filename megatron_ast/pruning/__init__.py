"""One-shot pruning of Hugging Face causal LMs: magnitude, Wanda, SparseGPT, SparseLLM."""
