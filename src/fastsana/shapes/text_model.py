"""The text encoder of the default Shapes model: a word-level tokenizer and a small Gemma-2 LM.

SANA conditions its DiT on the last hidden state of a decoder-only LLM (Gemma-2-2B-it). No
weights can be downloaded here, and the Shapes world speaks a language of a few dozen words, so
the default model gets its own, trained from scratch:

- ``build_tokenizer``: one token per lower-case word or run of punctuation; the vocabulary is
  every word the caption grammar can write plus the words of the complex human instruction
  (CHI), sorted, after Gemma's special tokens. Anything else maps to ``<unk>``.
- ``build_text_model``: the Gemma-2 architecture (``Gemma2ForCausalLM``) at 128 wide and 2
  layers, about half a million parameters, tied input/output embeddings.
- ``train_text_model``: next-token language modelling on captions drawn from the grammar on
  the fly, plus token recall (``RECALL_WINDOW``) and, on request, relation recall
  (``relation_labels``). Half of every batch is preceded by the CHI, as ``TextEncoder.encode``
  feeds prompts, so the instruction is in-distribution context; only caption tokens (and the
  end) are targets. It can also continue an existing encoder (``init_from``), held near its
  old features by an anchor loss so that a DiT trained on them still reads the new ones.
- ``evaluate_text_model``: facts a working LM and a usable encoder must show
  (``TextModelReport``).
- ``make_text_encoder``: all of it, saved as a pipeline's ``text_encoder/`` and ``tokenizer/``.

Why a language model at all: the DiT reads the LM's hidden states, and a decoder's state at a
word has attended to the words before it, so "circle" after "red" differs from "circle" after
"blue" — the colour is bound to the shape that follows it, which the DiT needs for attribute
binding — and the CHI in front gives even the first prompt word some context.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from fastsana.checkpoints.common import atomic_write_json
from fastsana.models.text_encoder import DEFAULT_INSTRUCTION, TextEncoder
from fastsana.shapes.grammar import COUNT_WORDS, RELATION_PHRASES, WILDCARD_NOUN, scene_captions
from fastsana.shapes.world import COLOURS, SHAPES, allowed_pairs, sample_scene

# Gemma's ids for its special tokens (pad 0, eos 1, bos 2), then unk.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))

HEAD_DIM = 32
# Longest input the encoder gives the model: the CHI (≈ 200 tokens) + 300 prompt tokens.
MAX_POSITIONS = 1024
IGNORE_INDEX = -100  # target value that the loss skips (instruction and padding positions)

# Token recall: during training, linear heads read the current token and the two before it
# from each final hidden state. A decoder LM's last layer is pushed towards the distribution of
# the next word, and in this language many words share it ("purple", "white" and "black" are
# followed by the same shapes; "a red circle" and "a blue circle" by the same words), so a pure
# LM's last states collapse them (measured: cosine > 0.9999, colour probe at chance). Three
# tokens span a mention ("three red circles"), so the state at a noun keeps its count and
# colour. The heads are dropped after training; the encoder is a plain Gemma-2 decoder.
RECALL_WINDOW = 3

# Relation recall: a training-only head reads, from each caption token's final state, the
# relation said so far (none, or one of RELATION_PHRASES). The LM objective gives no reason to
# carry it: what follows "to the left of a" is what follows "to the right of a", and the
# three-token window has passed the relation word by the second object's colour. Measured on
# the encoder trained without it (session 20): at the second object's noun, the features of
# "... to the left of a blue square" and "... to the right of a blue square" are equal to three
# decimals, so no DiT can read which side that object is on; "above"/"below", one word before
# the object, survive. With the head, the second object's noun carries its side.
NO_RELATION = 0  # label before any relation word; relation k of RELATION_PHRASES is k + 1

# Separate random streams for training and evaluation captions, whatever the seed.
TRAIN_STREAM = 0
EVAL_STREAM = 1
EVAL_SEED = 0


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Runs of word characters and runs of punctuation; whitespace only separates. Prompts reach
    # the model lower-cased and stripped, so spacing carries no meaning worth a token.
    return pre_tokenizers.Whitespace()


def caption_words() -> list[str]:
    """Every word the caption grammar writes, from the world's and the grammar's constants."""
    nouns = [*SHAPES, WILDCARD_NOUN]
    words = {
        *COUNT_WORDS.values(),
        "an",  # a count of one before a vowel ("an orange star")
        "one",  # a count of one written as a number
        *COLOURS,
        *nouns,
        *(noun + "s" for noun in nouns),
        *(word for phrase in RELATION_PHRASES.values() for word in phrase.split()),
        "and",
        ",",
    }
    return sorted(words)


def instruction_words(instruction: Sequence[str] = DEFAULT_INSTRUCTION) -> list[str]:
    """The lower-cased words and punctuation runs of ``instruction``."""
    text = "\n".join(instruction).lower()
    return sorted({piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text)})


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``caption_words()`` ∪ ``instruction_words()``.

    Lower-cases its input (the CHI keeps its capitals in ``TextEncoder.encode``), puts
    ``<bos>`` in front of every sequence, pads and truncates on the right. Unknown words map to
    ``<unk>``. Ids: the special tokens (Gemma's order), then the sorted words.
    """
    words = sorted(set(caption_words()) | set(instruction_words()))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        truncation_side="right",
        model_max_length=MAX_POSITIONS,
    )


def build_text_model(
    vocab_size: int, hidden_size: int = 128, layers: int = 2, seed: int = 0
) -> Gemma2ForCausalLM:
    """A Gemma-2 causal LM with random weights drawn from ``seed``, scaled down.

    Proportions follow Gemma-2-2B: MLP 4× wide, grouped-query attention with half as many
    key/value heads as query heads, attention scaled by the head dim, alternating sliding and
    full attention layers, logit soft-capping, tied embeddings. Heads are 32 wide, so
    ``hidden_size`` must be a multiple of 64.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 5:
        raise ValueError(
            f"vocab_size must be an int covering the {len(SPECIAL_TOKENS)} special tokens and at "
            f"least one word, got {vocab_size!r}"
        )
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 64:
        raise ValueError(f"hidden_size must be an int >= 64, got {hidden_size!r}")
    if hidden_size % (2 * HEAD_DIM) != 0:
        raise ValueError(
            f"hidden_size must be a multiple of {2 * HEAD_DIM} (an even number of "
            f"{HEAD_DIM}-wide heads), got {hidden_size}"
        )
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    heads = hidden_size // HEAD_DIM
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
    )
    # Weight init is transformers' Gemma-2 init (normal, std 0.02, for linear layers and
    # the embedding; RMSNorm weights 0, since Gemma's norm scales by 1 + weight). The embedding
    # is multiplied by sqrt(hidden_size) on input, so tokens enter at ≈ unit scale while the
    # tied output head starts with small logits: a standard, stable start for a small LM.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config)
    return model


def load_text_model(
    folder: str | os.PathLike[str],
) -> tuple[Gemma2ForCausalLM, PreTrainedTokenizerFast]:
    """A saved encoder (``folder/text_encoder`` and ``folder/tokenizer``, as
    ``make_text_encoder`` and pipeline folders hold them) as a trainable float32 causal LM; the
    LM head is the tied embedding, so no weights are missing. The tokenizer must be this
    module's (``build_tokenizer``)."""
    root = Path(folder)
    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} has no {sub}/ folder (expected a pipeline folder)")
    encoder = TextEncoder.from_pretrained(
        root / "text_encoder", root / "tokenizer", dtype=torch.float32, device="cpu"
    )
    if encoder.tokenizer.get_vocab() != build_tokenizer().get_vocab():
        raise ValueError(f"{root / 'tokenizer'} is not the Shapes tokenizer (build_tokenizer)")
    config = encoder.model.config
    if not isinstance(config, Gemma2Config) or not config.tie_word_embeddings:
        raise ValueError(f"{root / 'text_encoder'} is not a Gemma-2 decoder with tied embeddings")
    model = Gemma2ForCausalLM(config)
    model.model.load_state_dict(encoder.model.state_dict())
    model.tie_weights()
    return model.eval(), encoder.tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


def caption_stream(seed: int, stream: int = TRAIN_STREAM) -> Iterator[str]:
    """Endless captions of random training scenes: every caption of each scene in turn.

    Scenes and captions come from the dataset generator's own functions with the training
    pairs, so the corpus is the one the DiT trains on: complete, partial and wrong captions,
    held-out colour/shape pairs never named. Wrong captions are kept: they are sentences of the
    same grammar (false only of their image, which an LM never sees), and they add variety.
    """
    rng = np.random.default_rng([stream, seed])
    pairs = allowed_pairs(include_held_out=False)
    while True:
        objects = sample_scene(rng, pairs)
        for record in scene_captions(objects, rng, pairs):
            yield record.text


def _instruction_text() -> str:
    return "\n".join(DEFAULT_INSTRUCTION)  # joined as TextEncoder.encode joins it


@dataclass(frozen=True)
class LMBatch:
    """Token sequences that share a prefix, split so that the prefix runs once.

    ``context`` (1, C) is the shared prefix without its last token (C = 0 without an
    instruction). ``ids`` (B, T) holds the rest of each sequence — the prefix's last token
    (``<bos>`` or the instruction's last), the caption tokens, ``<eos>`` — padded on the right,
    and ``mask`` (B, T) marks its real tokens. ``targets`` (B, T) is the next token at the
    positions the encoder will show the DiT (the prefix's last token and the caption tokens),
    ``IGNORE_INDEX`` elsewhere.
    """

    context: Tensor
    ids: Tensor
    mask: Tensor
    targets: Tensor


def make_lm_batch(
    tokenizer: PreTrainedTokenizerFast, captions: Sequence[str], instruction: str | None
) -> LMBatch:
    """Captions (lower-cased and stripped, as the encoder does), after ``instruction`` if given,
    each followed by ``<eos>``."""
    if not captions:
        raise ValueError("captions must not be empty")
    prefix = instruction or ""
    prefix_ids = tokenizer(prefix)["input_ids"]  # <bos>, then the instruction
    shared = len(prefix_ids) - 1
    rests = []
    for caption in captions:
        ids = tokenizer(prefix + caption.lower().strip())["input_ids"]
        if ids[: len(prefix_ids)] != prefix_ids:
            raise ValueError(
                "the tokenizer splits the instruction differently when a caption follows it; "
                f"caption {caption!r}"
            )
        rests.append([*ids[shared:], EOS_ID])
    length = max(len(r) for r in rests)
    ids = torch.full((len(rests), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rests), length), dtype=torch.long)
    targets = torch.full((len(rests), length), IGNORE_INDEX, dtype=torch.long)
    for i, rest in enumerate(rests):
        ids[i, : len(rest)] = torch.tensor(rest)
        mask[i, : len(rest)] = 1
        targets[i, : len(rest) - 1] = torch.tensor(rest[1:])
    context = torch.tensor([prefix_ids[:shared]], dtype=torch.long)
    return LMBatch(context, ids, mask, targets)


def final_states(model: Gemma2ForCausalLM, batch: LMBatch) -> Tensor:
    """Last hidden states (after the final norm) at the positions of ``batch.ids``: (B, T, D).

    The same numbers as running every whole sequence, but the shared prefix (the instruction,
    ≈ 200 tokens against ≈ 15 per caption) runs once and its keys and values are repeated for
    every sequence; gradients flow back through them.
    """
    decoder = model.model
    if batch.context.shape[1] == 0:
        return decoder(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
    n, c = batch.ids.shape[0], batch.context.shape[1]
    cache = decoder(input_ids=batch.context, use_cache=True).past_key_values  # keys: 1 × C
    cache.batch_repeat_interleave(n)  # keys: B × C
    mask = torch.cat([batch.mask.new_ones(n, c), batch.mask], dim=1)  # (B, C + T)
    out = decoder(input_ids=batch.ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return out.last_hidden_state  # (B, T, D)


def lm_logits(model: Gemma2ForCausalLM, states: Tensor) -> Tensor:
    """Next-token logits from final states, with Gemma-2's tanh soft-capping: (..., V)."""
    logits = model.lm_head(states)  # (..., V)
    cap = model.config.final_logit_softcapping
    return logits if cap is None else cap * torch.tanh(logits / cap)  # (..., V)


def relation_word_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Token id of the word that names each relation of ``RELATION_PHRASES``, in its order:
    the one word of the phrase that no other phrase has ("left", "right", "above", "below")."""
    phrases = [phrase.split() for phrase in RELATION_PHRASES.values()]
    ids = []
    for words in phrases:
        own = [w for w in words if sum(w in other for other in phrases) == 1]
        if len(own) != 1:
            raise ValueError(f"relation phrase {' '.join(words)!r} has no single word of its own")
        ids.append(tokenizer.convert_tokens_to_ids(own[0]))
    return ids


def relation_labels(ids: Tensor, word_ids: Sequence[int]) -> Tensor:
    """(B, T) label of each position of ``ids`` (B, T): ``NO_RELATION`` until a relation word,
    then k + 1 for relation k of ``word_ids`` from that word on (the latest one wins)."""
    labels = torch.full_like(ids, NO_RELATION)
    current = torch.full_like(ids[:, 0], NO_RELATION)  # (B,)
    for t in range(ids.shape[1]):
        for k, word in enumerate(word_ids):
            current = torch.where(ids[:, t] == word, k + 1, current)
        labels[:, t] = current
    return labels


def _recall_heads(hidden_size: int, vocab_size: int, window: int, seed: int) -> nn.ModuleList:
    """Training-only linear heads: head ``d`` reads token ``p - d`` from the state at ``p``."""
    # Init like the LM's own linear layers (normal, std 0.02): small logits, so the recall loss
    # starts near log(vocab) as the LM loss does.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = nn.ModuleList(nn.Linear(hidden_size, vocab_size, bias=False) for _ in range(window))
        for head in heads:
            nn.init.normal_(head.weight, std=0.02)
    return heads


@dataclass
class _Objective:
    """The training-only parts of the loss: recall heads, the relation head, the anchor."""

    heads: nn.ModuleList
    relation_head: nn.Linear | None = None
    relation_ids: Sequence[int] = ()
    anchor: Gemma2ForCausalLM | None = None


def _loss_sums(
    model: Gemma2ForCausalLM, objective: _Objective, batch: LMBatch
) -> dict[str, tuple[Tensor, int]]:
    """{loss name: (sum over ``batch``, count)} for "lm" (next token), "recall" and, when the
    objective has them, "relation" (cross-entropy) and "anchor" (squared distance per feature
    to the anchor model's states)."""
    states = final_states(model, batch)  # (B, T, D)
    seen = batch.targets != IGNORE_INDEX  # (B, T): the positions the DiT reads
    logits = lm_logits(model, states[seen])  # (N, V)
    sums = {"lm": (F.cross_entropy(logits, batch.targets[seen], reduction="sum"), int(seen.sum()))}
    recall, n_recall = states.new_zeros(()), 0
    for d, head in enumerate(objective.heads):
        # Token p - d at positions p >= d (earlier prefix tokens are not in ids).
        where = seen[:, d:]  # (B, T - d)
        earlier = batch.ids[:, : batch.ids.shape[1] - d][where]  # (M,)
        recall = recall + F.cross_entropy(head(states[:, d:][where]), earlier, reduction="sum")
        n_recall += int(where.sum())
    sums["recall"] = (recall, n_recall)
    if objective.relation_head is not None:
        labels = relation_labels(batch.ids, objective.relation_ids)[seen]  # (N,)
        relation = F.cross_entropy(objective.relation_head(states[seen]), labels, reduction="sum")
        sums["relation"] = (relation, int(seen.sum()))
    if objective.anchor is not None:
        with torch.no_grad():
            target = final_states(objective.anchor, batch)[seen]  # (N, D)
        squared = (states[seen] - target).pow(2).sum()
        sums["anchor"] = (squared, int(seen.sum()) * states.shape[-1])
    return sums


def _warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # down to 10% of lr

    return factor


def train_text_model(
    model: Gemma2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    recall_window: int = RECALL_WINDOW,
    relation_recall: bool = False,
    anchor: Gemma2ForCausalLM | None = None,
    anchor_weight: float = 3.0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on Shapes captions; returns the next-token loss of each step.

    Each step draws ``batch_size`` fresh captions from ``caption_stream(seed)``; the first half
    follow the CHI, the rest stand alone. The loss is the mean next-token cross-entropy over
    caption tokens and ``<eos>``, plus the mean cross-entropy of ``recall_window`` token-recall
    heads (0 trains a pure LM; see ``RECALL_WINDOW``), plus, with ``relation_recall``, that of
    a head reading the relation said so far (see ``NO_RELATION``), plus, with an ``anchor``
    model (frozen; usually a copy of ``model`` before training), ``anchor_weight`` times the
    mean squared difference between the two models' final states at the tokens the DiT reads.
    AdamW, linear warm-up over 5% of the steps, cosine decay to 10% of ``lr``, gradients
    clipped at norm 1. Left in eval mode.
    """
    for name, value, low in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 2),
        ("seed", seed, 0),
        ("recall_window", recall_window, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, float | int) or not 0.0 < lr < 1.0:
        raise ValueError(f"lr must be a learning rate in (0, 1), got {lr!r}")
    if isinstance(anchor_weight, bool) or not isinstance(anchor_weight, float | int):
        raise ValueError(f"anchor_weight must be a number >= 0, got {anchor_weight!r}")
    if anchor_weight < 0:
        raise ValueError(f"anchor_weight must be >= 0, got {anchor_weight!r}")
    _check_pair(model, tokenizer)
    config = model.config
    heads = _recall_heads(config.hidden_size, config.vocab_size, recall_window, seed)
    objective = _Objective(heads)
    if relation_recall:
        objective.relation_ids = relation_word_ids(tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            head = nn.Linear(config.hidden_size, len(RELATION_PHRASES) + 1)
            nn.init.normal_(head.weight, std=0.02)  # as the recall heads: starts near log(5)
            nn.init.zeros_(head.bias)
        objective.relation_head = head
        heads = nn.ModuleList([*heads, head])  # every trained head, for the optimiser
    if anchor is not None:
        _check_pair(anchor, tokenizer)
        objective.anchor = anchor.eval().requires_grad_(False)
    parameters = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(steps, warmup=max(1, steps // 20))
    )
    captions = caption_stream(seed, TRAIN_STREAM)
    instruction = _instruction_text()
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="text encoder", unit="step", disable=not progress)
    for _ in bar:
        texts = [next(captions) for _ in range(batch_size)]
        half = batch_size // 2
        parts = [
            _loss_sums(model, objective, make_lm_batch(tokenizer, texts[:half], instruction)),
            _loss_sums(model, objective, make_lm_batch(tokenizer, texts[half:], None)),
        ]
        means = {
            name: sum(p[name][0] for p in parts) / max(1, sum(p[name][1] for p in parts))
            for name in parts[0]
        }
        total = sum((anchor_weight if name == "anchor" else 1.0) * v for name, v in means.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(means["lm"].item())
        bar.set_postfix({name: f"{value.item():.3f}" for name, value in means.items()})
    model.eval()
    return losses


def _check_pair(model: Gemma2ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    if not isinstance(model, Gemma2ForCausalLM):
        raise TypeError(f"model must be a Gemma2ForCausalLM, got {type(model).__name__}")
    if model.config.vocab_size != len(tokenizer):
        raise ValueError(
            f"model vocab_size {model.config.vocab_size} != tokenizer size {len(tokenizer)}"
        )


@dataclass(frozen=True)
class TextModelReport:
    """Quality of a text LM on fresh captions (``EVAL_STREAM``, never used for training).

    - ``loss``, ``accuracy``: mean next-token cross-entropy (nats) and arg-max accuracy over
      caption tokens and the end, captions following the CHI (as the pipeline encodes them).
    - ``accuracy_bare``: the same for captions on their own.
    - ``majority_accuracy``: always guessing the most frequent target token; a chance level that
      knows the word frequencies.
    - ``repeat_probability``: the mean probability of naming a colour/shape class a second time
      ("a red circle and a red" → "circle"), which the grammar never does;
      ``fresh_probability``: the same word when the first object has another colour ("a blue
      circle and a red" → "circle"), which it does. Telling them apart needs the colour bound
      to its shape in context.
    - ``colour_probe``: on the encoder's features (``TextEncoder.encode``, CHI on) of the last
      token of "a {colour} {shape}", the fraction of the 32 prompts whose colour is the nearest
      colour centroid of the other three shapes' prompts (chance: 1/8).
    - ``max_cosine``: the largest cosine similarity between those features for "a red circle",
      "a blue circle" and "a red square".
    - ``relation_probe``: on the encoder's features (no CHI) of the last token of
      "a C1 S1 <relation> a C2 S2", the fraction of held-out prompts whose relation is the
      nearest relation centroid of the other prompts (chance 1/4). The second object's side of
      the image is known exactly when its relation is: this is what a DiT needs there.
    """

    loss: float
    accuracy: float
    accuracy_bare: float
    majority_accuracy: float
    repeat_probability: float
    fresh_probability: float
    colour_probe: float
    max_cosine: float
    relation_probe: float

    def to_dict(self) -> dict[str, float]:
        return {name: round(value, 5) for name, value in vars(self).items()}


@torch.no_grad()
def evaluate_text_model(
    model: Gemma2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_captions: int = 512,
    batch_size: int = 128,
) -> TextModelReport:
    """Measure ``model`` on ``n_captions`` fresh captions and on fixed probe prompts."""
    for name, value in (("n_captions", n_captions), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_pair(model, tokenizer)
    was_training = model.training
    model.eval()
    stream = caption_stream(EVAL_SEED, EVAL_STREAM)
    captions = [next(stream) for _ in range(n_captions)]
    measured = {}
    for name, instruction in (("chi", _instruction_text()), ("bare", None)):
        loss, correct, targets = 0.0, 0, []
        for start in range(0, n_captions, batch_size):
            batch = make_lm_batch(tokenizer, captions[start : start + batch_size], instruction)
            seen = batch.targets != IGNORE_INDEX  # (B, T)
            logits = lm_logits(model, final_states(model, batch)[seen])  # (N, V)
            loss += F.cross_entropy(logits, batch.targets[seen], reduction="sum").item()
            correct += int((logits.argmax(-1) == batch.targets[seen]).sum())
            targets.append(batch.targets[seen])
        all_targets = torch.cat(targets)
        measured[name] = (loss / len(all_targets), correct / len(all_targets), all_targets)
    loss, accuracy, targets = measured["chi"]
    repeat, fresh = _repeat_probabilities(model, tokenizer)
    probe, max_cosine = _feature_checks(model, tokenizer)
    model.train(was_training)
    return TextModelReport(
        loss=loss,
        accuracy=accuracy,
        accuracy_bare=measured["bare"][1],
        majority_accuracy=int(torch.bincount(targets).max()) / len(targets),
        repeat_probability=repeat,
        fresh_probability=fresh,
        colour_probe=probe,
        max_cosine=max_cosine,
        relation_probe=_relation_probe(model, tokenizer),
    )


def _repeat_probabilities(
    model: Gemma2ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> tuple[float, float]:
    """Mean P(S) after "a C S and a C" (a repeat) and after "a C' S and a C" (C' != C).

    Training pairs only, so no context names a held-out pair.
    """
    pairs = allowed_pairs(include_held_out=False)
    repeats, fresh = [], []
    for colour, shape in pairs:
        other = next(c for c in COLOURS if c != colour and (c, shape) in pairs)
        repeats.append(f"a {colour} {shape} and a {colour}")
        fresh.append(f"a {other} {shape} and a {colour}")
    shape_ids = torch.tensor(tokenizer.convert_tokens_to_ids([shape for _, shape in pairs]))
    means = []
    for contexts in (repeats, fresh):
        batch = make_lm_batch(tokenizer, contexts, _instruction_text())
        last = batch.mask.sum(1) - 2  # (B,) the context's last word; <eos> follows it
        states = final_states(model, batch)[torch.arange(len(contexts)), last]  # (B, D)
        probs = lm_logits(model, states).softmax(-1)  # (B, V)
        means.append(float(probs[torch.arange(len(contexts)), shape_ids].mean()))
    return means[0], means[1]


def _feature_checks(
    model: Gemma2ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> tuple[float, float]:
    """(colour probe accuracy, max cosine) on the encoder's last-token features, CHI on."""
    encoder = TextEncoder(model, tokenizer)
    prompts = [f"a {colour} {shape}" for shape in SHAPES for colour in COLOURS]
    features, mask = encoder.encode(prompts, max_length=8)  # (B, 8, D), (B, 8)
    last = features[torch.arange(len(prompts)), mask.sum(1) - 1]  # (B, D)
    grid = last.view(len(SHAPES), len(COLOURS), -1)  # (shapes, colours, D)
    correct = 0
    for s in range(len(SHAPES)):
        centroids = torch.cat([grid[:s], grid[s + 1 :]]).mean(0)  # (colours, D)
        nearest = torch.cdist(grid[s], centroids).argmin(-1)  # (colours,)
        correct += int((nearest == torch.arange(len(COLOURS))).sum())
    trio = [prompts.index(p) for p in ("a red circle", "a blue circle", "a red square")]
    unit = F.normalize(last[trio], dim=-1)  # (3, D)
    cosines = unit @ unit.T  # (3, 3)
    return correct / len(prompts), float(cosines[~torch.eye(3, dtype=torch.bool)].max())


@torch.no_grad()
def feature_cosine(
    a: Gemma2ForCausalLM, b: Gemma2ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> float:
    """Mean cosine similarity between two encoders' features (CHI on) over the tokens of 256
    fresh captions: how far a continued encoder has moved from where it started."""
    stream = caption_stream(EVAL_SEED, EVAL_STREAM)
    captions = [next(stream) for _ in range(256)]
    first, mask = TextEncoder(a, tokenizer).encode(captions, max_length=32)  # (B, L, D)
    second, _ = TextEncoder(b, tokenizer).encode(captions, max_length=32)  # (B, L, D)
    real = mask.bool()  # (B, L)
    return round(float(F.cosine_similarity(first[real], second[real], dim=-1).mean()), 5)


def _relation_probe(model: Gemma2ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> float:
    """Nearest-centroid accuracy of the relation from the last-token features of two-object
    relation prompts: centroids from the even-numbered prompts, scored on the odd ones."""
    encoder = TextEncoder(model, tokenizer)
    pairs = allowed_pairs(include_held_out=False)
    prompts, labels = [], []
    for k, phrase in enumerate(RELATION_PHRASES.values()):
        for shift in (3, 7, 11, 17):  # about 20 prompts of two different shapes per shift
            for first, second in zip(pairs, pairs[shift:] + pairs[:shift], strict=True):
                if first[1] == second[1]:
                    continue
                prompts.append(f"a {first[0]} {first[1]} {phrase} a {second[0]} {second[1]}")
                labels.append(k)
    # No CHI: the default model encodes its prompts bare (model_index.json).
    features, mask = encoder.encode(prompts, instruction=None, max_length=12)  # (B, 12, D)
    last = features[torch.arange(len(prompts)), mask.sum(1) - 1]  # (B, D)
    labels_t = torch.tensor(labels)
    fit = torch.arange(len(prompts)) % 2 == 0
    centroids = torch.stack([last[fit & (labels_t == k)].mean(0) for k in range(4)])  # (4, D)
    nearest = torch.cdist(last[~fit], centroids).argmin(-1)  # (B / 2,)
    return float((nearest == labels_t[~fit]).float().mean())


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, then restore the previous count.

    The LM's tensors are tiny (a few hundred tokens × 128 per op), so splitting ops across
    threads costs more than it saves: on the shared 2-core development machine, training ran at
    11.4 steps/s with one thread and 0.85 steps/s with two.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of threads, got {n!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_text_encoder(
    out_dir: str | os.PathLike[str],
    *,
    steps: int,
    seed: int = 0,
    hidden_size: int = 128,
    layers: int = 2,
    batch_size: int = 64,
    lr: float = 3e-3,
    recall_window: int = RECALL_WINDOW,
    relation_recall: bool = False,
    init_from: str | os.PathLike[str] | None = None,
    anchor_weight: float = 3.0,
    threads: int = 1,
    progress: bool = True,
) -> dict:
    """Build, train, evaluate and save the text encoder; returns the training summary.

    Writes ``out_dir/text_encoder`` (the ``Gemma2Model`` decoder without its LM head, fp16
    safetensors) and ``out_dir/tokenizer``, the layout of a pipeline folder, and the summary
    (settings, losses, reports before and after training, timing, file sizes) as
    ``out_dir/text_encoder_training.json``. Runs with ``threads`` torch threads (see
    ``torch_threads``).

    ``init_from``: continue a saved encoder (``load_text_model``; its size replaces
    ``hidden_size`` and ``layers``) instead of a new one, held near its starting features by an
    anchor loss of weight ``anchor_weight`` (0: none), so that a DiT trained on the old features
    can be continued on the new ones. ``relation_recall``: see ``NO_RELATION``.
    """
    out = Path(out_dir)
    anchor = None
    if init_from is None:
        tokenizer = build_tokenizer()
        model = build_text_model(len(tokenizer), hidden_size=hidden_size, layers=layers, seed=seed)
    else:
        model, tokenizer = load_text_model(init_from)
        hidden_size, layers = model.config.hidden_size, model.config.num_hidden_layers
        anchor = copy.deepcopy(model) if anchor_weight > 0 else None
    with torch_threads(threads):
        before = evaluate_text_model(model, tokenizer)
        start = time.perf_counter()
        losses = train_text_model(
            model,
            tokenizer,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            recall_window=recall_window,
            relation_recall=relation_recall,
            anchor=anchor,
            anchor_weight=anchor_weight,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        after = evaluate_text_model(model, tokenizer)
        drift = None if anchor is None else feature_cosine(anchor, model, tokenizer)
    TextEncoder(model, tokenizer).save_pretrained(
        out / "text_encoder", out / "tokenizer", dtype=torch.float16
    )
    files = {
        str(path.relative_to(out)): path.stat().st_size
        for folder in ("text_encoder", "tokenizer")
        for path in sorted((out / folder).iterdir())
    }
    summary = {
        "settings": {
            "steps": steps,
            "seed": seed,
            "hidden_size": hidden_size,
            "layers": layers,
            "batch_size": batch_size,
            "lr": lr,
            "recall_window": recall_window,
            "relation_recall": relation_recall,
            "init_from": None if init_from is None else str(Path(init_from).resolve()),
            "anchor_weight": anchor_weight if anchor is not None else 0.0,
            "threads": threads,
        },
        "vocab_size": len(tokenizer),
        "parameters": count_parameters(model),
        "train_seconds": round(seconds, 2),
        "steps_per_second": round(steps / seconds, 3),
        "torch_threads": threads,
        "final_loss": round(float(np.mean(losses[-max(1, steps // 20) :])), 5),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "feature_cosine_to_start": drift,
        "files": files,
        "losses": [round(loss, 5) for loss in losses],
    }
    atomic_write_json(out / "text_encoder_training.json", summary)
    return summary
