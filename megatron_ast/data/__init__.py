"""Token shards (Megatron IndexedDataset format), tokenizers, manifests and the blended sampler."""
