"""Tiny random-config models of several architectures, saved as real model directories with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")
SLIDING_WINDOW = 8  # small, so test documents overflow it and sliding layers really drop tokens


def byte_tokenizer(add_bos: bool):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def config_for(arch: str):
    common = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, rope_theta=10000.0)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**common, sliding_window=None)
    if arch == "mistral-sliding":  # the window from the config alone: its attention modules carry none
        from transformers import MistralConfig

        return MistralConfig(**common, sliding_window=SLIDING_WINDOW)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, head_dim=16, sliding_window=SLIDING_WINDOW,
                                layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])
    raise ValueError(arch)


def make_model_dir(arch: str, directory: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(arch))
    # Random init is too timid to make attention matter; larger weights make cache errors visible in logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    byte_tokenizer(add_bos=arch in ("llama", "gemma3")).save_pretrained(directory)
    return directory
