"""The model side: loading models, running them forward, the KV cache in memory, rotary frequencies, attention measurement and batched prefill."""
