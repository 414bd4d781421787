"""The Shapes text encoder: tokenizer coverage, the Gemma-2 LM, its training, saving/loading."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from transformers import Gemma2ForCausalLM, Gemma2Model

from fastsana.checkpoints.common import read_json
from fastsana.cli import main
from fastsana.models.text_encoder import DEFAULT_INSTRUCTION, TextEncoder
from fastsana.shapes.bench import bench_prompts
from fastsana.shapes.grammar import scene_captions
from fastsana.shapes.text_model import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    build_text_model,
    build_tokenizer,
    caption_words,
    count_parameters,
    evaluate_text_model,
    feature_cosine,
    final_states,
    lm_logits,
    load_text_model,
    make_lm_batch,
    relation_labels,
    relation_word_ids,
    torch_threads,
    train_text_model,
)
from fastsana.shapes.world import allowed_pairs, sample_scene

CHI = "\n".join(DEFAULT_INSTRUCTION)
TRAIN_STEPS = 150  # enough for the checks below (measured: colour probe 0.75, accuracy 0.44)


def _words(text: str) -> list[str]:
    """Lower-case words and punctuation runs, split independently of the tokenizer."""
    return re.findall(r"[a-z0-9_]+|[^\sa-z0-9_]+", text.lower())


def _corpus(n_scenes: int = 1000) -> list[str]:
    """Captions of random scenes that may contain every colour/shape pair, and the benchmark."""
    rng = np.random.default_rng(123)
    pairs = allowed_pairs(include_held_out=True)
    texts = [spec.text for spec in bench_prompts()]
    for _ in range(n_scenes):
        texts += [r.text for r in scene_captions(sample_scene(rng, pairs), rng, pairs)]
    return texts


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny; one thread is much faster on a shared machine (see torch_threads)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def trained(tokenizer):
    """(untrained report, trained model, trained report, losses) of a short training run."""
    model = build_text_model(len(tokenizer), seed=0)
    before = evaluate_text_model(model, tokenizer, n_captions=128)
    losses = train_text_model(
        model, tokenizer, steps=TRAIN_STEPS, batch_size=32, seed=0, progress=False
    )
    after = evaluate_text_model(model, tokenizer, n_captions=128)
    return before, model, after, losses


def test_vocabulary_is_exactly_the_grammar_and_the_instruction(tokenizer) -> None:
    corpus = _corpus()
    used = {word for text in corpus for word in _words(text)}
    # Every word the generator writes is in the vocabulary, and every caption word derived from
    # the constants is one the generator actually writes (no dead entries).
    assert used == set(caption_words())
    vocab = tokenizer.get_vocab()
    instruction = {word for line in DEFAULT_INSTRUCTION for word in _words(line)}
    assert set(vocab) == {*SPECIAL_TOKENS, *used, *instruction}
    unk = tokenizer.unk_token_id
    for text in [*corpus, CHI]:
        assert unk not in tokenizer(text)["input_ids"], text


def test_tokenizer_layout(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.get)
    assert ordered[:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0, 1, 2
    assert ordered[4:] == sorted(ordered[4:])
    assert build_tokenizer().get_vocab() == vocab  # deterministic
    assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "right"
    ids = tokenizer("  A Red CIRCLE, to the left of a blue square.")["input_ids"]
    words = ["a", "red", "circle", ",", "to", "the", "left", "of", "a", "blue", "square", "."]
    assert ids == [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(words)]
    # Unknown words do not crash; each becomes <unk>.
    ids = tokenizer("a magenta dodecahedron")["input_ids"]
    assert ids == [tokenizer.bos_token_id, vocab["a"], *[tokenizer.unk_token_id] * 2]


def test_text_model_architecture(tokenizer) -> None:
    model = build_text_model(len(tokenizer))
    assert isinstance(model, Gemma2ForCausalLM)
    assert 300_000 <= count_parameters(model) <= 2_000_000
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    config = model.config
    assert config.head_dim * config.num_attention_heads == config.hidden_size
    assert config.num_attention_heads % config.num_key_value_heads == 0
    same = build_text_model(len(tokenizer), seed=0).state_dict()
    other = build_text_model(len(tokenizer), seed=1).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[name], same[name])
    assert not torch.equal(model.state_dict()[name], other[name])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 3}, "vocab_size"),
        ({"vocab_size": 100, "hidden_size": 96}, "multiple of 64"),
        ({"vocab_size": 100, "layers": 0}, "layers"),
    ],
)
def test_build_text_model_rejects_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_text_model(**kwargs)


def test_torch_threads_restores_the_count() -> None:
    previous = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == previous
    with pytest.raises(ValueError, match="threads"), torch_threads(0):
        pass


def test_train_rejects_bad_arguments(tokenizer) -> None:
    model = build_text_model(len(tokenizer), hidden_size=64, layers=1)
    with pytest.raises(ValueError, match="steps"):
        train_text_model(model, tokenizer, steps=0)
    with pytest.raises(ValueError, match="lr"):
        train_text_model(model, tokenizer, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        train_text_model(build_text_model(50, hidden_size=64), tokenizer, steps=1)


def test_lm_batch_targets_are_the_caption_and_end(tokenizer) -> None:
    captions = ["Two red circles ", "a star"]
    for instruction in (CHI, None):
        batch = make_lm_batch(tokenizer, captions, instruction)
        for i, caption in enumerate(captions):
            caption_ids = tokenizer(caption.lower().strip(), add_special_tokens=False)["input_ids"]
            real = batch.ids[i][batch.mask[i].bool()].tolist()
            # Last shared token (the instruction's, or <bos>), the caption, <eos>.
            shared = tokenizer(instruction or "")["input_ids"]
            assert real == [shared[-1], *caption_ids, tokenizer.eos_token_id]
            assert batch.context[0].tolist() == shared[:-1]
            targets = batch.targets[i][batch.targets[i] != IGNORE_INDEX].tolist()
            assert targets == [*caption_ids, tokenizer.eos_token_id]


@pytest.mark.parametrize("instruction", [CHI, None])
def test_shared_prefix_forward_matches_whole_sequences(tokenizer, instruction) -> None:
    model = build_text_model(len(tokenizer), seed=3).eval()
    captions = ["a red circle to the left of a blue square", "three green stars", "a shape"]
    batch = make_lm_batch(tokenizer, captions, instruction)
    with torch.no_grad():
        fast = lm_logits(model, final_states(model, batch))  # (B, T, V)
        n, c = len(captions), batch.context.shape[1]
        ids = torch.cat([batch.context.expand(n, c), batch.ids], dim=1)
        mask = torch.cat([torch.ones(n, c, dtype=torch.long), batch.mask], dim=1)
        reference = model(input_ids=ids, attention_mask=mask).logits[:, c:]  # transformers' own
    real = batch.mask.bool()
    torch.testing.assert_close(fast[real], reference[real], rtol=1e-5, atol=1e-5)


def test_training_makes_a_working_language_model(trained) -> None:
    before, _, after, losses = trained
    assert len(losses) == TRAIN_STEPS
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 2.0
    assert after.loss < before.loss - 2.0
    # Next-token accuracy on fresh captions: far above always guessing the most frequent word,
    # and above the untrained model, with and without the instruction in front.
    for accuracy, untrained in (
        (after.accuracy, before.accuracy),
        (after.accuracy_bare, before.accuracy_bare),
    ):
        assert accuracy > 2 * after.majority_accuracy
        assert accuracy > untrained + 0.25


def test_encoder_features_tell_colours_apart(trained) -> None:
    before, _, after, _ = trained
    # The colour of "a {colour} {shape}" is readable from the shape token's feature (chance 1/8),
    # and "a red circle" / "a blue circle" / "a red square" are not near-identical vectors, as
    # they are for the untrained model (≈ 0.998) and for a pure LM (measured > 0.9999).
    assert after.colour_probe >= 0.5
    assert after.max_cosine < 0.98
    assert before.max_cosine > after.max_cosine


def test_saved_folders_load_and_encode_the_same(trained, tokenizer, tmp_path) -> None:
    _, model, _, _ = trained
    encoder = TextEncoder(model, tokenizer)
    encoder.save_pretrained(tmp_path / "text_encoder", tmp_path / "tokenizer", torch.float16)
    loaded = TextEncoder.from_pretrained(tmp_path / "text_encoder", tmp_path / "tokenizer")
    assert isinstance(loaded.model, Gemma2Model)  # the decoder only, no LM head
    assert loaded.dtype == torch.float32
    prompts = ["A red circle to the left of a blue square", "three green stars", "a teal blob"]
    assert loaded.tokenizer(prompts)["input_ids"] == tokenizer(prompts)["input_ids"]

    # The same model with fp16-rounded weights, built in memory: the round trip must be exact
    # up to float32 arithmetic; against the unrounded model, within fp16 rounding effects.
    rounded = build_text_model(len(tokenizer))
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    rounded_encoder = TextEncoder(rounded, tokenizer)
    for instruction in (DEFAULT_INSTRUCTION, None):
        got, got_mask = loaded.encode(prompts, instruction=instruction, max_length=12)
        exact, exact_mask = rounded_encoder.encode(prompts, instruction=instruction, max_length=12)
        full, _ = encoder.encode(prompts, instruction=instruction, max_length=12)
        assert torch.equal(got_mask, exact_mask)
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, full, rtol=0, atol=0.05)
        assert (got - full).abs().mean() < 5e-3


def test_cli_writes_a_pipeline_layout(tmp_path, capsys) -> None:
    argv = ["shapes", "text-encoder", str(tmp_path), "--steps", "3", "--hidden", "64"]
    assert main([*argv, "--layers", "1"]) == 0
    assert "accuracy" in capsys.readouterr().out
    summary = read_json(tmp_path / "text_encoder_training.json", "summary")
    assert len(summary["losses"]) == 3
    assert summary["settings"]["hidden_size"] == 64
    weights = tmp_path / "text_encoder" / "model.safetensors"
    # fp16: two bytes a parameter, plus the safetensors header.
    assert 2 * summary["parameters"] <= weights.stat().st_size < 2 * summary["parameters"] + 8192
    assert summary["files"]["text_encoder/model.safetensors"] == weights.stat().st_size
    loaded = TextEncoder.from_pretrained(tmp_path / "text_encoder", tmp_path / "tokenizer")
    assert loaded.hidden_size == 64


def test_relation_labels_follow_the_relation_word(tokenizer) -> None:
    words = relation_word_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(words) == ["left", "right", "above", "below"]
    texts = ["a red circle to the right of a blue square", "three stars", "a star above a circle"]
    batch = make_lm_batch(tokenizer, texts, None)
    labels = relation_labels(batch.ids, words)
    real = batch.mask.bool()
    # <bos> a red circle to the right of a blue square <eos>: "right" (2) from its word on.
    assert labels[0][real[0]].tolist() == [0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2]
    assert labels[1][real[1]].tolist() == [0] * 4  # <bos> three stars <eos>: no relation
    assert labels[2][real[2]].tolist() == [0, 0, 0, 3, 3, 3, 3]  # <bos> a star above ...


def test_relation_recall_puts_the_relation_into_the_last_token(trained, tokenizer) -> None:
    # The same continuation (80 steps, anchored to the start) with and without the relation
    # head; only the head makes the relation readable at the second object's noun. Measured:
    # start 0.67, without the head 0.69, with it 0.77 (chance 0.25).
    _, model, after, _ = trained
    probes = {}
    for relation_recall in (False, True):
        continued, anchor = copy.deepcopy(model), copy.deepcopy(model)
        train_text_model(
            continued,
            tokenizer,
            steps=80,
            batch_size=32,
            lr=3e-3,
            seed=1,
            relation_recall=relation_recall,
            anchor=anchor,
            anchor_weight=3.0,
            progress=False,
        )
        probes[relation_recall] = evaluate_text_model(continued, tokenizer, n_captions=16)
        # The anchor holds the features near the start (cosine 1 = unchanged).
        assert feature_cosine(anchor, continued, tokenizer) > 0.95
    assert probes[True].relation_probe >= probes[False].relation_probe + 0.05
    assert probes[True].relation_probe >= after.relation_probe + 0.05
    assert probes[True].colour_probe >= after.colour_probe - 0.1  # binding kept


def test_train_rejects_a_negative_anchor_weight(tokenizer) -> None:
    model = build_text_model(len(tokenizer), hidden_size=64, layers=1)
    with pytest.raises(ValueError, match="anchor_weight"):
        train_text_model(model, tokenizer, steps=1, anchor=model, anchor_weight=-1.0)


def test_load_text_model_continues_a_saved_encoder(trained, tokenizer, tmp_path) -> None:
    _, model, _, _ = trained
    TextEncoder(model, tokenizer).save_pretrained(
        tmp_path / "text_encoder", tmp_path / "tokenizer", torch.float32
    )
    loaded, loaded_tokenizer = load_text_model(tmp_path)
    assert isinstance(loaded, Gemma2ForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, nothing missing
    batch = make_lm_batch(tokenizer, ["a red circle above a blue square"], CHI)
    with torch.no_grad():
        torch.testing.assert_close(
            lm_logits(loaded, final_states(loaded, batch)),
            lm_logits(model, final_states(model, batch)),
        )
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_text_model(tmp_path / "tokenizer")


def test_cli_continues_an_encoder_with_relation_recall(trained, tokenizer, tmp_path) -> None:
    _, model, _, _ = trained
    start = tmp_path / "start"
    TextEncoder(model, tokenizer).save_pretrained(start / "text_encoder", start / "tokenizer")
    out = tmp_path / "out"
    argv = ["shapes", "text-encoder", str(out), "--steps", "3", "--init-from", str(start)]
    assert main([*argv, "--relation-recall", "--hidden", "64"]) == 0
    summary = read_json(out / "text_encoder_training.json", "summary")
    settings = summary["settings"]
    assert settings["relation_recall"] is True and settings["anchor_weight"] == 3.0
    assert settings["hidden_size"] == model.config.hidden_size  # the start's size, not --hidden
    assert settings["init_from"] == str(start.resolve())
    assert 0.9 < summary["feature_cosine_to_start"] <= 1.0
    assert "relation_probe" in summary["after"]
