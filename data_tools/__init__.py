"""Offline data tools: RedPajama jsonl -> Megatron token shards (no trainer needed)."""
