"""Tiny random decoders of several architectures, for pipeline tests (no downloads)."""
from __future__ import annotations

import torch

ARCHS = ["llama", "qwen2", "mistral", "phi3", "gemma", "gpt_neox", "opt"]


def tiny_model(arch: str, seed: int = 0):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    if arch == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif arch == "phi3":
        cfg = tf.Phi3Config(num_key_value_heads=4, pad_token_id=0, **common)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(num_key_value_heads=2, head_dim=12, **common)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=96, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=96, hidden_size=48, ffn_dim=88, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=48)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def random_ids(n: int, seqlen: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer(vocab: int = 96):
    """A word-level tokenizer with ``vocab`` ids (``t0`` … ``t{vocab-1}``; ``t0`` is EOS/BOS/PAD), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", bos_token="t0", pad_token="t0",
                                   unk_token="t1")
