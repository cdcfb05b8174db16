"""Train the byte-level BPE tokenizer that ``pdserve make-model`` ships with its random models.

Layout of the vocabulary (``len(tokenizer) == vocab_size`` exactly)::

    0 ........................ B-1 | B ................................ vocab_size-1
    byte-level BPE (256 bytes +    | special tokens, in Llama 3 order:
    merges learned on corpus/)     |   B+0 <|begin_of_text|>   B+1 <|end_of_text|>
                                   |   B+2..B+5 <|reserved_special_token_0..3|>
                                   |   B+6 <|start_header_id|> B+7 <|end_header_id|>
                                   |   B+8 <|reserved_special_token_4|>  B+9 <|eot_id|>
                                   |   B+10.. <|reserved_special_token_5|>, _6, ... up to the end

The BPE is trained to ``vocab_size - 256`` tokens, so ``B == vocab_size - 256`` whenever the corpus holds
enough distinct merges (true for the tiny and small presets); when it does not (the 128256-token llama3-8b
shape), the gap is filled with more reserved special tokens, as Llama 3 does for its unused ids.

Qwen2 variants (``qwen2=True``) differ only in pre-tokenization: NFC, then Qwen2's split pattern (digits one
by one) before the byte-level mapping, because transformers rebuilds a ``qwen2`` tokenizer that way from
vocab and merges; training with the same split keeps ``tokenizer.json`` and ``AutoTokenizer`` in agreement.

Behaviour to rely on (Llama 3 behaviour, for both variants): encoding with special tokens *prepends*
``<|begin_of_text|>`` via the post-processor and never appends an eos. The chat template starts with
``bos_token`` itself, so text rendered from it must be encoded with ``add_special_tokens=False``. Training is
deterministic: the same ``vocab_size`` always yields byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from services.modelgen.preset import MIN_VOCAB_SIZE

CORPUS_DIR = Path(__file__).with_name("corpus")

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
NUM_RESERVED_FOR_SPECIALS = 256

# Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, other whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Positions of the named tokens inside the special block, as in Llama 3; every other slot is reserved.
_NAMED_SPECIALS: dict[int, str] = {
    0: BOS_TOKEN,
    1: EOS_TOKEN,
    6: START_HEADER_TOKEN,
    7: END_HEADER_TOKEN,
    9: EOT_TOKEN,
}

# Llama-3-style headers; accepts string content or OpenAI-style lists of {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] | trim -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the named special tokens in a trained tokenizer."""

    bos: int
    eos: int
    start_header: int
    end_header: int
    eot: int


def special_token_names(count: int) -> list[str]:
    """The ``count`` special tokens in Llama 3 order (named ones at their Llama 3 slots, the rest reserved)."""
    if count < max(_NAMED_SPECIALS) + 1:
        raise ValueError(f"need room for at least {max(_NAMED_SPECIALS) + 1} special tokens, got {count}")
    names: list[str] = []
    reserved = 0
    for slot in range(count):
        if slot in _NAMED_SPECIALS:
            names.append(_NAMED_SPECIALS[slot])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def corpus_files() -> list[Path]:
    """The committed training text, in a fixed order."""
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no tokenizer corpus (*.txt) found in {CORPUS_DIR}")
    return files


@functools.lru_cache(maxsize=8)
def _trained_json(vocab_size: int, qwen2: bool) -> str:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    if qwen2:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_RESERVED_FOR_SPECIALS,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train([str(p) for p in corpus_files()], trainer)
    base_size = tokenizer.get_vocab_size()
    specials = special_token_names(vocab_size - base_size)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, expected {vocab_size}")
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    return tokenizer.to_str()


def train_tokenizer(vocab_size: int, qwen2: bool = False) -> Tokenizer:
    """Train (or fetch from the per-process cache) the tokenizer with exactly ``vocab_size`` tokens."""
    return Tokenizer.from_str(_trained_json(vocab_size, qwen2))


def special_token_ids(tokenizer: Tokenizer) -> SpecialTokenIds:
    """Look up the named special tokens; raises if ``tokenizer`` was not built by this module."""
    ids = [tokenizer.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN)]
    if any(i is None for i in ids):
        raise ValueError("tokenizer lacks the Llama 3 special tokens")
    return SpecialTokenIds(*[int(i) for i in ids if i is not None])


def write_tokenizer_files(
    out_dir: Path, vocab_size: int, model_max_length: int, qwen2: bool = False
) -> SpecialTokenIds:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    tokenizer = train_tokenizer(vocab_size, qwen2)
    (out_dir / "tokenizer.json").write_text(_trained_json(vocab_size, qwen2), encoding="utf-8")
    tokenizer_config: dict[str, object] = {
        # transformers 5 always builds Qwen2Tokenizer for model_type qwen2; null unk/pad keep it from adding
        # its <|endoftext|> default, so len(tokenizer) stays vocab_size.
        "tokenizer_class": "Qwen2Tokenizer" if qwen2 else "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN})
    return special_token_ids(tokenizer)


def _write_json(path: Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
