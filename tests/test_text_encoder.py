"""TextEncoder: parity with diffusers' SanaPipeline.encode_prompt, loading, masks, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaPipeline
from tiny_text import PROMPT_TEXTS, make_text_components, save_text_components
from transformers import Gemma2ForCausalLM

from fastsana.models.text_encoder import DEFAULT_INSTRUCTION, TextEncoder

LONG_PROMPT = " ".join(PROMPT_TEXTS)  # longer than the small max_length values below
PROMPTS = ["  A Cat sleeping on a red SOFA ", "an old library", PROMPT_TEXTS[1], LONG_PROMPT]
NEGATIVES = ["", "  Two small dogs ", "a cat", "a photo of the moon"]


@pytest.fixture(scope="module")
def components():
    return make_text_components(texts=["Hello there", "Goodbye then"], hidden_size=32, seed=0)


@pytest.fixture(scope="module")
def encoder(components) -> TextEncoder:
    model, tokenizer = components
    return TextEncoder(model, tokenizer)


@pytest.fixture(scope="module")
def pipe(components) -> SanaPipeline:
    # encode_prompt only needs the tokenizer and the text encoder; diffusers accepts None for
    # the other components, so the reference runs its own, unpatched code.
    model, tokenizer = components
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None, scheduler=None
    )


def reference(pipe, prompts, instruction, max_length, negatives=None):
    return pipe.encode_prompt(
        prompts,
        do_classifier_free_guidance=negatives is not None,
        negative_prompt=negatives if negatives is not None else "",
        device=torch.device("cpu"),
        max_sequence_length=max_length,
        complex_human_instruction=None if instruction is None else list(instruction),
    )


@pytest.mark.parametrize("max_length", [300, 16, 1])
@pytest.mark.parametrize("with_instruction", [True, False])
def test_prompts_match_diffusers(encoder, pipe, with_instruction, max_length):
    instruction = DEFAULT_INSTRUCTION if with_instruction else None
    expected, expected_mask, _, _ = reference(pipe, PROMPTS, instruction, max_length)
    embeds, mask = encoder.encode(PROMPTS, instruction=instruction, max_length=max_length)
    assert embeds.shape == (len(PROMPTS), max_length, encoder.hidden_size)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert mask.dtype == expected_mask.dtype
    assert torch.equal(mask, expected_mask)


def test_custom_instruction_matches_diffusers(encoder, pipe):
    lines = ["Hello there.", "Goodbye then, User Prompt: "]
    expected, expected_mask, _, _ = reference(pipe, PROMPTS, lines, 24)
    for instruction in (lines, "\n".join(lines)):  # a string is the joined lines
        embeds, mask = encoder.encode(PROMPTS, instruction=instruction, max_length=24)
        torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
        assert torch.equal(mask, expected_mask)


@pytest.mark.parametrize("max_length", [300, 8])
def test_negative_prompts_match_diffusers(encoder, pipe, max_length):
    # The positive prompts' instruction does not affect the negative path; None keeps it cheap.
    _, _, expected, expected_mask = reference(pipe, PROMPTS, None, max_length, negatives=NEGATIVES)
    embeds, mask = encoder.encode_negative(NEGATIVES, max_length=max_length)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert torch.equal(mask, expected_mask)


def test_causal_lm_gives_base_model_states(components, encoder):
    model, tokenizer = components
    causal = Gemma2ForCausalLM(model.config)
    causal.model.load_state_dict(model.state_dict())
    expected, expected_mask = encoder.encode(PROMPTS, max_length=16)
    embeds, mask = TextEncoder(causal, tokenizer).encode(PROMPTS, max_length=16)
    assert embeds.shape[-1] == model.config.hidden_size  # states, not vocabulary logits
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert torch.equal(mask, expected_mask)


def test_from_pretrained_matches_in_memory(components, encoder, tmp_path):
    model, tokenizer = components
    expected, expected_mask = encoder.encode(PROMPTS, max_length=16)

    model_dir, tokenizer_dir = save_text_components(tmp_path / "pipe", model, tokenizer)
    assert list(model_dir.glob("*.safetensors"))
    loaded = TextEncoder.from_pretrained(model_dir, tokenizer_dir, device="cpu")
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    embeds, mask = loaded.encode(PROMPTS, max_length=16)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert torch.equal(mask, expected_mask)

    # AutoModel on a causal-LM folder (how Gemma-2-2B-it is published) gives the base model.
    causal = Gemma2ForCausalLM(model.config)
    causal.model.load_state_dict(model.state_dict())
    causal.save_pretrained(tmp_path / "causal")
    from_causal = TextEncoder.from_pretrained(tmp_path / "causal", tokenizer_dir, device="cpu")
    embeds, _ = from_causal.encode(PROMPTS, max_length=16)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)


def test_prompts_are_lower_cased_and_stripped(encoder):
    tokenizer = encoder.tokenizer
    # The vocabulary distinguishes cases, so this test could fail.
    assert tokenizer.encode("A Cat SOFA") != tokenizer.encode("a cat sofa")
    for instruction in (DEFAULT_INSTRUCTION, None):
        raw, raw_mask = encoder.encode(
            ["  A Cat on a red SOFA \n"], instruction=instruction, max_length=24
        )
        clean, clean_mask = encoder.encode(
            ["a cat on a red sofa"], instruction=instruction, max_length=24
        )
        torch.testing.assert_close(raw, clean, rtol=0, atol=0)
        assert torch.equal(raw_mask, clean_mask)


@pytest.mark.parametrize("with_instruction", [True, False])
def test_mask_is_a_prefix_of_the_tokens_kept(encoder, with_instruction):
    # The tiny tokenizer's pieces add up: the kept window starts at the instruction's last
    # token, so it holds BOS, that token and the prompt's tokens; without instruction BOS and
    # the prompt's tokens.
    prompts = ["a cat", "an old library", "two small dogs playing in the snow"]
    instruction = DEFAULT_INSTRUCTION if with_instruction else None
    _, mask = encoder.encode(prompts, instruction=instruction, max_length=24)
    assert mask.shape == (3, 24)
    for row, prompt in zip(mask, prompts, strict=True):
        n_tokens = len(encoder.tokenizer.encode(prompt, add_special_tokens=False))
        n_ones = n_tokens + (2 if with_instruction else 1)
        assert row[:n_ones].eq(1).all() and row[n_ones:].eq(0).all()


def test_instruction_content_reaches_prompt_tokens(encoder):
    prompts = ["a cat sleeping on a red sofa"]
    with_chi, mask = encoder.encode(prompts, max_length=24)
    without_chi, _ = encoder.encode(prompts, instruction=None, max_length=24)
    # The prompt's tokens sit at 2..n+1, after BOS and the instruction's last token.
    n = len(encoder.tokenizer.encode(prompts[0], add_special_tokens=False))
    assert int(mask[0].sum()) == n + 2
    assert not torch.allclose(with_chi[:, 2 : n + 2], without_chi[:, 1 : n + 1])
    # Same token count, different words: the prompt tokens sit at the same positions, so any
    # change comes through attention to the instruction.
    first, _ = encoder.encode(prompts, instruction=["Hello there", "User Prompt: "], max_length=24)
    second, _ = encoder.encode(
        prompts, instruction=["Goodbye then", "User Prompt: "], max_length=24
    )
    assert (first[0, 2 : n + 2] - second[0, 2 : n + 2]).abs().amax() > 1e-4


def test_to_and_offload_keep_the_model_usable(components):
    model, tokenizer = components
    encoder = TextEncoder(model, tokenizer)
    assert encoder.to("cpu") is encoder and encoder.offload() is encoder
    assert encoder.device.type == "cpu"
    assert encoder.hidden_size == 32


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompts": []}, ValueError, "at least one prompt"),
        ({"prompts": "a cat"}, TypeError, "wrap one prompt in a list"),
        ({"prompts": ["a cat", 3]}, TypeError, r"prompts\[1\] must be a str"),
        ({"prompts": ["a cat"], "max_length": 0}, ValueError, "max_length"),
        ({"prompts": ["a cat"], "max_length": True}, ValueError, "max_length"),
        ({"prompts": ["a cat"], "instruction": []}, ValueError, "instruction=None"),
        ({"prompts": ["a cat"], "instruction": ["ok", 1]}, TypeError, r"instruction\[1\]"),
        ({"prompts": ["a cat"], "instruction": 5}, TypeError, "instruction must be"),
    ],
)
def test_bad_input_raises(encoder, kwargs, error, message):
    with pytest.raises(error, match=message):
        encoder.encode(**kwargs)


def test_bad_tokenizer_raises(components):
    model, _ = components
    _, tokenizer = make_text_components()
    tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match="truncation_side"):
        TextEncoder(model, tokenizer)
    _, tokenizer = make_text_components()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        TextEncoder(model, tokenizer)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        TextEncoder(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(FileNotFoundError, match="text_encoder_dir"):
        TextEncoder.from_pretrained("/nonexistent/text_encoder", "/nonexistent/tokenizer")


def test_precision_variant_folder_loads(tmp_path) -> None:
    """A text_encoder/ folder holding only `model.bf16.safetensors` (official layout) loads."""
    from tiny_text import make_text_components

    from fastsana.models.text_encoder import TextEncoder

    model, tokenizer = make_text_components(["a red circle"])
    model.save_pretrained(tmp_path / "te", variant="bf16")
    tokenizer.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "te" / "model.bf16.safetensors").is_file()
    encoder = TextEncoder.from_pretrained(tmp_path / "te", tmp_path / "tok", device="cpu")
    expected, _ = TextEncoder(model, tokenizer).encode(["a red circle"], instruction=None)
    got, _ = encoder.encode(["a red circle"], instruction=None)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("instruction", [None, ["Hello there", "User Prompt: "]])
@pytest.mark.parametrize("max_length", [24, 5])
def test_echo_keeps_the_second_copy_of_a_full_forward(components, encoder, instruction, max_length):
    """Echo: each row is what the bare model gives for "[instruction] prompt ⏎ prompt" run on
    its own (tokenized as one text), at BOS and the second copy's (first max_length - 1)
    tokens; prompts of different lengths share one padded batch."""
    model, tokenizer = components
    prompts = ["a cat", "two small dogs playing in the snow", "an old library"]
    emb, mask = encoder.encode(prompts, instruction=instruction, max_length=max_length, echo=True)
    assert emb.shape == (3, max_length, encoder.hidden_size)
    chi = "" if instruction is None else "\n".join(instruction)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(chi + prompt + "\n" + prompt, return_tensors="pt")["input_ids"]
        n = min(len(tokenizer.encode(prompt, add_special_tokens=False)), max_length - 1)
        n_copy = len(tokenizer.encode(prompt, add_special_tokens=False))
        with torch.no_grad():
            full = model.base_model(input_ids=ids).last_hidden_state[0]  # (T, D)
        start = ids.shape[1] - n_copy  # the second copy ends the text
        expected = torch.cat([full[:1], full[start : start + n]])
        torch.testing.assert_close(emb[row, : n + 1], expected, rtol=1e-5, atol=1e-5)
        assert mask[row, : n + 1].eq(1).all() and mask[row, n + 1 :].eq(0).all()
        assert emb[row, n + 1 :].eq(0).all()  # padding positions carry nothing


def test_echo_lets_early_tokens_see_later_words(encoder):
    """Without echo a causal model's first prompt tokens cannot depend on later words; with
    echo they do. The empty prompt (the null caption) is BOS alone either way."""
    prompts = ["a cat sleeping on a red sofa", "a cat sleeping on a sofa"]
    plain, _ = encoder.encode(prompts, instruction=None, max_length=24)
    echoed, _ = encoder.encode(prompts, instruction=None, max_length=24, echo=True)
    torch.testing.assert_close(plain[0, :4], plain[1, :4], rtol=0, atol=0)  # "<bos> a ␣ cat"
    assert (echoed[0, 1:4] - echoed[1, 1:4]).abs().amax() > 1e-4
    null_plain, null_mask = encoder.encode_negative([""], max_length=8)
    null_echo, echo_mask = encoder.encode_negative([""], max_length=8, echo=True)
    assert torch.equal(null_mask, echo_mask) and int(echo_mask.sum()) == 1
    torch.testing.assert_close(null_echo[:, 0], null_plain[:, 0], rtol=1e-5, atol=1e-5)
