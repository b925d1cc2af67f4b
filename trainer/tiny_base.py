"""Build a tiny but real base model: a Qwen3ForCausalLM plus a byte-level BPE tokenizer.

No model can be downloaded here, so ``trainer-ctl init-base --tiny`` makes one from scratch:
random (seeded) weights, a tokenizer trained on the bundled corpus (trainer/assets/corpus.txt),
special tokens and a ChatML chat template whose assistant content sits inside
``{% generation %}...{% endgeneration %}`` (so ``return_assistant_tokens_mask`` works).
The result is an ordinary Hugging Face folder that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load offline, also in 4-bit through bitsandbytes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.atomic import fsync_dir, fsync_tree, give_default_modes

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS = ASSETS / "corpus.txt"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]

# Qwen2/Qwen3's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs,
# newlines, whitespace. Digits one per token keep arithmetic learnable for a tiny model.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML. Assistant content and its <|im_end|> are inside the generation block: that is what the
# model must learn to produce (including when to stop); the newline after it is not.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

log = logging.getLogger(__name__)


def train_tokenizer(vocab_size: int = 1024, corpus: Path = CORPUS) -> Any:
    """A byte-level BPE (``PreTrainedTokenizerFast``) trained on *corpus*, with the chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = corpus.read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    tok.train_from_iterator(paragraphs, trainer=trainer, length=len(paragraphs))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=PAD, unk_token=None, bos_token=None,
        additional_special_tokens=[IM_START, IM_END], model_max_length=1 << 30,
        clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_base(out_dir: Path, *, seed: int = 0, vocab_size: int = 1024, hidden_size: int = 64,
                    intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                    num_kv_heads: int = 2, head_dim: int = 16,
                    max_position_embeddings: int = 2048, embedding_std: float = 0.3) -> Path:
    """Build the tiny base into *out_dir* (which must not exist) and return it.

    Built in a temp dir beside *out_dir*, fsynced, then renamed into place: a crash leaves either
    nothing or a complete folder. Same arguments give byte-identical weights and tokenizer.

    ``embedding_std``: the (tied) embedding matrix is drawn with this std instead of the usual
    0.02. LoRA trains neither the embeddings nor the final norm, so with hidden size 64 the
    output layer must already separate tokens: at std 0.02 the largest logit LoRA can reach is
    ~1.3 and a fine-tune plateaus near ln(vocab) (~6.1 nats), whatever it learns. At 0.3 the
    initial loss is higher (~10) but QLoRA on the built-in arithmetic data falls to ~1.3 in 400
    steps. The other weights keep Qwen3's init (std 0.02).
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; refusing to overwrite a base model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tokenizer = train_tokenizer(vocab_size)
        if len(tokenizer) > vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {vocab_size}")
        ids = tokenizer.convert_tokens_to_ids
        config = Qwen3Config(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, head_dim=head_dim,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
            rope_theta=10000.0, bos_token_id=None, eos_token_id=ids(ENDOFTEXT),
            pad_token_id=ids(PAD), use_cache=True)
        # Seed a private copy of the RNG: the caller's torch RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3ForCausalLM(config)
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0.0, embedding_std)
        model.eval()
        model.generation_config = GenerationConfig(
            eos_token_id=[ids(IM_END), ids(ENDOFTEXT)], pad_token_id=ids(PAD), bos_token_id=None,
            do_sample=False)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        give_default_modes(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        meta = {"kind": "tiny-qwen3", "created_at": datetime.now(timezone.utc).isoformat(),
                "seed": seed, "parameters": n_params,
                "config": {"vocab_size": vocab_size, "hidden_size": hidden_size,
                           "intermediate_size": intermediate_size, "num_layers": num_layers,
                           "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                           "head_dim": head_dim, "max_position_embeddings": max_position_embeddings,
                           "embedding_std": embedding_std},
                "tokenizer_tokens": len(tokenizer)}
        (tmp / "base.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
        fsync_tree(tmp)
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} appeared while building; refusing to overwrite")
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built tiny Qwen3 base (%d parameters, %d tokens) at %s", n_params, len(tokenizer),
             out_dir)
    return out_dir
