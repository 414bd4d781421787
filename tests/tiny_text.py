"""Tiny, offline stand-ins for the Gemma-2 text encoder and its tokenizer, for tests.

The tokenizer is word-level: text splits into runs of word characters, runs of punctuation and
single whitespace characters, each looked up in a fixed vocabulary (unknown pieces map to
``<unk>``), and a template adds ``<bos>`` in front, as Gemma's tokenizer does. Keeping spaces
and newlines as tokens makes it, like Gemma's, sensitive to stripping and to how the
instruction is joined to the prompt, so tests of those details can fail. The vocabulary is
built from example texts so that the test prompts and the instruction map to distinct tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

from fastsana.models.text_encoder import DEFAULT_INSTRUCTION

# Gemma's special-token ids: pad 0, eos 1, bos 2; unk 3.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")

# Pieces of the prompts the tests use, in both cases: the encoder lower-cases prompts, while the
# instruction keeps its case.
PROMPT_TEXTS = (
    "a cat sleeping on a red sofa",
    "A photo of an astronaut riding a horse on the moon, highly detailed.",
    "two small dogs playing in the snow near a wooden house at sunset",
    "an old library",
)


def _splitter() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\s"), behavior="isolated")


def vocabulary(texts: Iterable[str]) -> list[str]:
    """Special tokens, then every piece of ``texts`` and its lower-case form."""
    pieces: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
    for text in texts:
        for piece, _ in _splitter().pre_tokenize_str(text):
            pieces.setdefault(piece)
            pieces.setdefault(piece.lower())
    return list(pieces)


def make_tokenizer(texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer covering ``texts``, the test prompts and ``DEFAULT_INSTRUCTION``.

    Adds ``<bos>`` in front of every sequence; pads on the right with ``<pad>``.
    """
    words = vocabulary([*PROMPT_TEXTS, *DEFAULT_INSTRUCTION, *texts])
    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = _splitter()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def make_gemma2(vocab_size: int, hidden_size: int = 32, seed: int = 0) -> Gemma2Model:
    """A 2-layer ``Gemma2Model`` with random weights drawn from ``seed``, in eval mode."""
    if hidden_size % 16 != 0:
        raise ValueError(f"hidden_size must be a multiple of 16 (head dim), got {hidden_size}")
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=hidden_size // 16,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2Model(config)
    return model.eval()


def make_text_components(
    texts: Iterable[str] = (), hidden_size: int = 32, seed: int = 0
) -> tuple[Gemma2Model, PreTrainedTokenizerFast]:
    """A tiny Gemma-2 model and a tokenizer whose vocabulary it matches."""
    tokenizer = make_tokenizer(texts)
    return make_gemma2(len(tokenizer), hidden_size=hidden_size, seed=seed), tokenizer


def save_text_components(
    folder: str | os.PathLike[str], model: Gemma2Model, tokenizer: PreTrainedTokenizerFast
) -> tuple[Path, Path]:
    """Write ``folder/text_encoder`` (safetensors) and ``folder/tokenizer``, as in a diffusers
    pipeline folder; returns both paths."""
    folder = Path(folder)
    model_dir, tokenizer_dir = folder / "text_encoder", folder / "tokenizer"
    model.save_pretrained(model_dir)  # safetensors is the default format
    tokenizer.save_pretrained(tokenizer_dir)
    return model_dir, tokenizer_dir
