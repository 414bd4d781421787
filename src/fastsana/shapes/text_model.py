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
  the fly, plus token recall (``RECALL_WINDOW``). Half of every batch is preceded by the CHI, as
  ``TextEncoder.encode`` feeds prompts, so the instruction is in-distribution context; only
  caption tokens (and the end) are targets.
- ``evaluate_text_model``: facts a working LM and a usable encoder must show
  (``TextModelReport``).
- ``make_text_encoder``: all of it, saved as a pipeline's ``text_encoder/`` and ``tokenizer/``.

Why a language model at all: the DiT reads the LM's hidden states, and a decoder's state at a
word has attended to the words before it, so "circle" after "red" differs from "circle" after
"blue" — the colour is bound to the shape that follows it, which the DiT needs for attribute
binding — and the CHI in front gives even the first prompt word some context.
"""

from __future__ import annotations

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


def _loss_sums(
    model: Gemma2ForCausalLM, heads: nn.ModuleList, batch: LMBatch
) -> tuple[Tensor, int, Tensor, int]:
    """(next-token loss sum, its count, recall loss sum, its count) over ``batch``."""
    states = final_states(model, batch)  # (B, T, D)
    seen = batch.targets != IGNORE_INDEX  # (B, T)
    logits = lm_logits(model, states[seen])  # (N, V)
    lm = F.cross_entropy(logits, batch.targets[seen], reduction="sum")
    recall, n_recall = states.new_zeros(()), 0
    for d, head in enumerate(heads):
        # Token p - d at positions p >= d (earlier prefix tokens are not in ids).
        where = seen[:, d:]  # (B, T - d)
        earlier = batch.ids[:, : batch.ids.shape[1] - d][where]  # (M,)
        recall = recall + F.cross_entropy(head(states[:, d:][where]), earlier, reduction="sum")
        n_recall += int(where.sum())
    return lm, int(seen.sum()), recall, n_recall


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
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on Shapes captions; returns the next-token loss of each step.

    Each step draws ``batch_size`` fresh captions from ``caption_stream(seed)``; the first half
    follow the CHI, the rest stand alone. The loss is the mean next-token cross-entropy over
    caption tokens and ``<eos>``, plus the mean cross-entropy of ``recall_window`` token-recall
    heads (0 trains a pure LM; see ``RECALL_WINDOW``). AdamW, linear warm-up over 5% of the
    steps, cosine decay to 10% of ``lr``, gradients clipped at norm 1. Left in eval mode.
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
    _check_pair(model, tokenizer)
    config = model.config
    heads = _recall_heads(config.hidden_size, config.vocab_size, recall_window, seed)
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
        sums = [
            _loss_sums(model, heads, make_lm_batch(tokenizer, texts[:half], instruction)),
            _loss_sums(model, heads, make_lm_batch(tokenizer, texts[half:], None)),
        ]
        lm = sum(s[0] for s in sums) / sum(s[1] for s in sums)
        recall = sum(s[2] for s in sums) / max(1, sum(s[3] for s in sums))
        optimizer.zero_grad(set_to_none=True)
        (lm + recall).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(lm.item())
        bar.set_postfix(lm=f"{lm.item():.3f}", recall=f"{recall.item():.3f}")
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
    """

    loss: float
    accuracy: float
    accuracy_bare: float
    majority_accuracy: float
    repeat_probability: float
    fresh_probability: float
    colour_probe: float
    max_cosine: float

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
    threads: int = 1,
    progress: bool = True,
) -> dict:
    """Build, train, evaluate and save the text encoder; returns the training summary.

    Writes ``out_dir/text_encoder`` (the ``Gemma2Model`` decoder without its LM head, fp16
    safetensors) and ``out_dir/tokenizer``, the layout of a pipeline folder, and the summary
    (settings, losses, reports before and after training, timing, file sizes) as
    ``out_dir/text_encoder_training.json``. Runs with ``threads`` torch threads (see
    ``torch_threads``).
    """
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_text_model(len(tokenizer), hidden_size=hidden_size, layers=layers, seed=seed)
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
            progress=progress,
        )
        seconds = time.perf_counter() - start
        after = evaluate_text_model(model, tokenizer)
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
        "files": files,
        "losses": [round(loss, 5) for loss in losses],
    }
    atomic_write_json(out / "text_encoder_training.json", summary)
    return summary
