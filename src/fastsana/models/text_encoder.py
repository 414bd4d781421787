"""Prompt encoder: a frozen decoder-only LLM (Gemma-2-2B-it for SANA) read at its last layer.

SANA conditions its DiT on the last hidden state (after the final norm) of a decoder-only LLM.
A decoder-only model sees each token only through the tokens before it, so a short prompt on
its own gives features with little context. SANA therefore puts a fixed "complex human
instruction" (CHI) in front of the prompt, asking the LLM to imagine a detailed picture, and
keeps the BOS position plus the last ``max_length - 1`` positions: the prompt tokens (and the
instruction's last token), whose features have now attended to the instruction.

Encoding, per batch of prompts (the slicing matches diffusers' ``SanaPipeline.encode_prompt``):

1. Lower-case and strip each prompt; prepend the instruction (joined by newlines) when given.
2. Tokenize with BOS, right padding and right truncation to ``n_chi + max_length - 2`` tokens,
   ``n_chi`` being the length of the instruction alone with its BOS; ``max_length`` without one.
3. Run the LLM with the attention mask; take the last hidden state.
4. Keep position 0 and the last ``max_length - 1`` positions of the states and of the mask.

Negative prompts are encoded without the instruction (``encode_negative``).

**Echo** (``echo=True``, an option of ours; Springer et al., 2024, "Repetition Improves
Language Model Embeddings"). A causal LLM cannot put a later word into an earlier token: in "a
red circle to the left of a blue square" the features of "red circle" cannot know that it is
the one on the left. With echo the prompt is written twice, ``[instruction] prompt ⏎ prompt``,
and the features kept are BOS and those of the second copy, every one of which has attended to
the whole prompt. The DiT then sees the same number of tokens as without echo.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fastsana.checkpoints.common import atomic_folder, detect_variant

DEFAULT_MAX_LENGTH = 300

# Our own wording of the prompt-enhancer instruction. The joined text ends with "User Prompt: "
# so the (lower-cased) prompt follows it directly, as in the reference pipelines.
DEFAULT_INSTRUCTION: tuple[str, ...] = (
    "You are a prompt enhancer for an image generator. Read the short user prompt at the end "
    "and picture the full scene it describes.",
    "- If the prompt is brief, think about the colour, shape, size and texture of each object, "
    "where the objects stand relative to each other, and the lighting and mood of the scene.",
    "- If the prompt is already rich in detail, keep its meaning and only make its details "
    "sharper.",
    "Two examples of the transformation:",
    "- User Prompt: A dog on a beach -> Enhanced: A golden retriever with wet, sandy fur runs "
    "along the edge of the surf on a wide pale beach, a low orange evening sun behind it "
    "casting long blue shadows.",
    "- User Prompt: An old library -> Enhanced: A tall wood-panelled library lit by brass lamps, "
    "shelves of worn leather books rising to a painted ceiling, dust floating in a beam of "
    "light from a narrow arched window.",
    "Answer with the enhanced description of the prompt below only, with no comments.",
    "User Prompt: ",
)

# Between the two copies of an echoed prompt; whitespace-splitting tokenizers drop it.
ECHO_SEPARATOR = "\n"

Instruction = str | Sequence[str] | None


class TextEncoder:
    """A frozen decoder-only LLM and its tokenizer, turning prompts into DiT conditioning.

    ``model`` may be a base decoder (``Gemma2Model``) or a causal LM (``Gemma2ForCausalLM``);
    the base model's ``last_hidden_state`` is used in both cases. The model is put in eval mode.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"model must be a transformers PreTrainedModel, got {type(model).__name__}"
            )
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                "tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase), "
                f"got {type(tokenizer).__name__}"
            )
        if tokenizer.pad_token is None:
            raise ValueError("tokenizer has no pad token; prompts are padded to a fixed length")
        if tokenizer.truncation_side != "right":
            # Left truncation would cut the instruction, not the end of a long prompt.
            raise ValueError(
                f"tokenizer.truncation_side must be 'right', got {tokenizer.truncation_side!r}"
            )
        # A causal LM wraps the decoder; its logits head is not needed. For a bare decoder
        # ``base_model`` is the model itself.
        self.model: PreTrainedModel = model.base_model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | os.PathLike[str],
        tokenizer_dir: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> TextEncoder:
        """Load a model folder (config + safetensors) and a tokenizer folder, offline.

        ``device`` defaults to CUDA when available, else CPU; ``dtype`` to bfloat16 on CUDA
        (Gemma-2 is published in bf16) and float32 on CPU.
        """
        for name, folder in (
            ("text_encoder_dir", text_encoder_dir),
            ("tokenizer_dir", tokenizer_dir),
        ):
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"{name}: {folder} is not a folder")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        model = AutoModel.from_pretrained(
            str(text_encoder_dir),
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            variant=detect_variant(Path(text_encoder_dir), "model"),  # e.g. model.bf16.safetensors
        )
        return cls(model.to(device), tokenizer)

    def save_pretrained(
        self,
        text_encoder_dir: str | os.PathLike[str],
        tokenizer_dir: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
    ) -> None:
        """Write the model (safetensors) and the tokenizer as two folders, the layout of a
        diffusers pipeline's ``text_encoder/`` and ``tokenizer/``. Each folder is written to
        a temporary sibling first and renamed into place, so a crash leaves no half folder."""
        state = None
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in self.model.state_dict().items()}
        with atomic_folder(Path(text_encoder_dir)) as tmp:
            self.model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            if dtype is not None:  # the config records the stored dtype for loaders
                config = json.loads((tmp / "config.json").read_text())
                config["dtype"] = str(dtype).removeprefix("torch.")
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
        with atomic_folder(Path(tokenizer_dir)) as tmp:
            self.tokenizer.save_pretrained(str(tmp))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        return self

    def offload(self) -> TextEncoder:
        """Move the model to CPU and release the accelerator memory it held."""
        was_on_cuda = self.device.type == "cuda"
        self.model.to("cpu")
        if was_on_cuda:
            torch.cuda.empty_cache()
        return self

    @torch.no_grad()  # no_grad, not inference_mode: the outputs may feed a trained DiT
    def encode(
        self,
        prompts: Sequence[str],
        *,
        instruction: Instruction = DEFAULT_INSTRUCTION,
        max_length: int = DEFAULT_MAX_LENGTH,
        echo: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Embeddings (B, max_length, hidden_size) and mask (B, max_length) int64, 1 = token.

        ``instruction``: a string, or lines joined with newlines; ``None`` encodes the bare
        prompts. ``echo``: encode each prompt twice and keep the second copy (module doc).
        """
        texts = _preprocess(prompts)
        _check_max_length(max_length)
        chi = _join_instruction(instruction)
        if echo:
            return self._encode_echo(texts, chi, max_length)
        if chi is None:
            total_length = max_length
        else:
            n_chi = len(self.tokenizer.encode(chi))
            if n_chi < 2:
                raise ValueError(
                    "instruction must tokenize to at least one token besides BOS, got "
                    f"{n_chi} token(s); pass instruction=None to encode without one"
                )
            texts = [chi + text for text in texts]
            total_length = n_chi + max_length - 2
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            padding_side="right",
            max_length=total_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = self.device
        ids = tokens["input_ids"].to(device)  # (B, total_length)
        mask = tokens["attention_mask"].to(device)  # (B, total_length)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        # Keep BOS and the last max_length - 1 positions. An explicit start index, because a
        # slice [-0:] would keep everything when max_length is 1.
        start = total_length - (max_length - 1)
        hidden = torch.cat([hidden[:, :1], hidden[:, start:]], dim=1)  # (B, max_length, D)
        mask = torch.cat([mask[:, :1], mask[:, start:]], dim=1)  # (B, max_length)
        return hidden, mask

    def _encode_echo(
        self, texts: list[str], chi: str | None, max_length: int
    ) -> tuple[Tensor, Tensor]:
        """``[chi] text ⏎ text`` per prompt; BOS and the second copy's features are kept.

        The copy is tokenized on its own (as a bare prompt is) and truncated to
        ``max_length - 1`` tokens; the prefix before it differs in length from prompt to
        prompt, so each row's copy is gathered from its own offset."""
        tok = self.tokenizer
        prefixes = tok(
            [(chi or "") + text + ECHO_SEPARATOR for text in texts], add_special_tokens=True
        )["input_ids"]  # BOS, [instruction], the first copy
        copies = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length - 1)[
            "input_ids"
        ]
        total = max(len(p) + len(c) for p, c in zip(prefixes, copies, strict=True))
        ids = torch.full((len(texts), total), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(texts), total), dtype=torch.long)
        for i, (prefix, copy) in enumerate(zip(prefixes, copies, strict=True)):
            row = prefix + copy
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        device = self.device
        hidden = self.model(
            input_ids=ids.to(device), attention_mask=attention.to(device)
        ).last_hidden_state  # (B, total, D)
        starts = torch.tensor([len(p) for p in prefixes])  # (B,) where each copy begins
        lengths = torch.tensor([len(c) for c in copies])  # (B,)
        offsets = torch.arange(max_length - 1)  # (max_length - 1,)
        keep = offsets[None] < lengths[:, None]  # (B, max_length - 1)
        where = (starts[:, None] + offsets[None]).clamp(max=total - 1)  # (B, max_length - 1)
        copy = hidden.gather(1, where.to(device)[..., None].expand(-1, -1, hidden.shape[-1]))
        copy = copy * keep.to(device, copy.dtype)[..., None]  # padding rows zeroed
        hidden = torch.cat([hidden[:, :1], copy], dim=1)  # (B, max_length, D)
        mask = torch.cat([attention[:, :1], keep.long()], dim=1).to(device)  # (B, max_length)
        return hidden, mask

    def encode_negative(
        self, prompts: Sequence[str], *, max_length: int = DEFAULT_MAX_LENGTH, echo: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Negative (unconditional) prompts: encoded without the instruction, as SANA does
        (echoed when the model was trained with echo, so that "" matches its null caption)."""
        return self.encode(prompts, instruction=None, max_length=max_length, echo=echo)


def _preprocess(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a str; wrap one prompt in a list")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
    return [prompt.lower().strip() for prompt in prompts]


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")


def _join_instruction(instruction: Instruction) -> str | None:
    if instruction is None:
        return None
    if isinstance(instruction, str):
        lines: Sequence[str] = [instruction]
    elif isinstance(instruction, Sequence):
        lines = instruction
    else:
        raise TypeError(
            "instruction must be a str, a list of str lines, or None, "
            f"got {type(instruction).__name__}"
        )
    for i, line in enumerate(lines):
        if not isinstance(line, str):
            raise TypeError(f"instruction[{i}] must be a str, got {type(line).__name__}")
    text = "\n".join(lines)
    if not text:
        raise ValueError("instruction is empty; pass instruction=None to encode without one")
    return text
