"""Numerical parity of our Linear DiT with diffusers' SanaTransformer2DModel (random weights).

Each case builds the diffusers model from a config, saves it, loads it with
``fastsana.load_transformer`` and compares outputs on the same inputs in fp32.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastsana import load_transformer
from fastsana.checkpoints.transformer import config_from_official
from fastsana.configs import DIT_PRESETS

diffusers = pytest.importorskip("diffusers")

BASE = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=32,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=32,
    cross_attention_dim=64,
    caption_channels=48,
    sample_size=8,
)

CASES = {
    "patch1-nonsquare": dict(config={}, batch=2, size=(12, 10)),
    "patch2-batch3": dict(config=dict(patch_size=2), batch=3, size=(12, 8)),
    "qk-norm-bias": dict(
        config=dict(qk_norm="rms_norm_across_heads", attention_bias=True), batch=2, size=(6, 10)
    ),
    "guidance": dict(config=dict(guidance_embeds=True), batch=2, size=(8, 8), guidance=True),
    "sincos-pe-native": dict(config=dict(interpolation_scale=1.0), batch=2, size=(8, 8)),
    "sincos-pe-resized": dict(config=dict(interpolation_scale=2.0), batch=2, size=(12, 16)),
    "wide-cross-mlp3": dict(
        config=dict(num_cross_attention_heads=3, cross_attention_head_dim=16, mlp_ratio=3.0),
        batch=2,
        size=(5, 7),
    ),
    "three-layers-patch2-pe": dict(
        config=dict(num_layers=3, patch_size=2, interpolation_scale=1.0, sample_size=16),
        batch=1,
        size=(16, 24),
    ),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (diffusers' init leaves some norms at exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(cfg: dict, batch: int, size: tuple[int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], *size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    length = 7
    text = torch.randn(batch, length, cfg["caption_channels"], generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0  # padding in the first caption
    if batch > 1:
        mask[-1, 2:] = 0
    return x, t, text, mask


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name: str, tmp_path) -> None:
    case = CASES[name]
    cfg = {**BASE, **case["config"]}
    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel(**cfg).eval()
    _randomize(ref, seed=1)
    ref.save_pretrained(tmp_path / "transformer")

    ours = load_transformer(tmp_path / "transformer")
    x, t, text, mask = _inputs(cfg, case["batch"], case["size"])
    guidance = torch.full((case["batch"],), 4.5) if case.get("guidance") else None
    with torch.no_grad():
        expected = ref(
            x, text, t, guidance=guidance, encoder_attention_mask=mask, return_dict=False
        )[0]
        got = ours(x, t, text, mask, guidance=guidance)
    assert got.shape == expected.shape == x.shape
    assert _relative_error(got, expected) <= 1e-4


def test_sharded_diffusers_folder(tmp_path) -> None:
    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel(**BASE).eval()
    ref.save_pretrained(tmp_path / "t", max_shard_size="100KB")
    assert list((tmp_path / "t").glob("*.index.json")), "expected a sharded save"
    ours = load_transformer(tmp_path / "t")
    x, t, text, mask = _inputs(BASE, 2, (8, 8))
    with torch.no_grad():
        expected = ref(x, text, t, encoder_attention_mask=mask, return_dict=False)[0]
        assert _relative_error(ours(x, t, text, mask), expected) <= 1e-4


# ------------------------------------------------------------------ official NVlabs format
# Written here independently from the facts file's key table (diffusers → official).
_TO_OFFICIAL = [
    ("patch_embed.proj.", "x_embedder.proj."),
    ("time_embed.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("time_embed.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("time_embed.linear.", "t_block.1."),
    ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
    ("caption_norm.", "attention_y_norm."),
    ("proj_out.", "final_layer.linear."),
]
_BLOCK_TO_OFFICIAL = {
    "attn1.to_out.0.": "attn.proj.",
    "attn1.norm_q.": "attn.q_norm.",
    "attn1.norm_k.": "attn.k_norm.",
    "attn2.to_q.": "cross_attn.q_linear.",
    "attn2.to_out.0.": "cross_attn.proj.",
    "attn2.norm_q.": "cross_attn.q_norm.",
    "attn2.norm_k.": "cross_attn.k_norm.",
    "ff.conv_inverted.": "mlp.inverted_conv.conv.",
    "ff.conv_depth.": "mlp.depth_conv.conv.",
    "ff.conv_point.": "mlp.point_conv.conv.",
}


def _to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in blocks:
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for suffix in ("weight", "bias"):
            qkv = [state.get(f"{src}attn1.to_{n}.{suffix}") for n in "qkv"]
            if qkv[0] is not None:
                out[f"{dst}attn.qkv.{suffix}"] = torch.cat(qkv, 0)
            kv = [state.get(f"{src}attn2.to_{n}.{suffix}") for n in "kv"]
            if kv[0] is not None:
                out[f"{dst}cross_attn.kv_linear.{suffix}"] = torch.cat(kv, 0)
        out[f"{dst}scale_shift_table"] = state[f"{src}scale_shift_table"]
        for k, v in state.items():
            if not k.startswith(src):
                continue
            rest = k[len(src) :]
            for old, new in _BLOCK_TO_OFFICIAL.items():
                if rest.startswith(old):
                    out[dst + new + rest[len(old) :]] = v
    for k, v in state.items():
        if k.startswith("transformer_blocks."):
            continue
        if k == "scale_shift_table":
            out["final_layer.scale_shift_table"] = v
            continue
        for old, new in _TO_OFFICIAL:
            if k.startswith(old):
                out[new + k[len(old) :]] = v
                break
        else:
            raise AssertionError(f"test mapping misses {k}")
    out["y_embedder.y_embedding"] = torch.randn(7, BASE["caption_channels"])  # dropped on load
    return out


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_official_format(fmt: str, qk_norm: str | None, tmp_path) -> None:
    cfg = {**BASE, "qk_norm": qk_norm}
    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel(**cfg).eval()
    _randomize(ref, seed=2)
    official = _to_official(ref.state_dict())
    path = tmp_path / f"model.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": official, "step": 10}, path)
    else:
        save_file(official, str(path))
    # Tiny widths are not in the released head-count table, so the config is given.
    from fastsana.checkpoints.transformer import config_from_diffusers

    ours = load_transformer(path, config=config_from_diffusers(cfg))
    x, t, text, mask = _inputs(cfg, 2, (6, 9))
    with torch.no_grad():
        expected = ref(x, text, t, encoder_attention_mask=mask, return_dict=False)[0]
        assert _relative_error(ours(x, t, text, mask), expected) <= 1e-4


@pytest.mark.parametrize("preset", ["sana-0.6b", "sana-1.6b", "sana-1.5-4.8b"])
def test_official_config_inference_for_released_sizes(preset: str) -> None:
    """The architecture is read off the official tensors' shapes (meta tensors: no memory)."""
    config = DIT_PRESETS[preset].config
    from fastsana.checkpoints.transformer import config_to_diffusers

    raw = config_to_diffusers(config)
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k != "dropout"}
    with torch.device("meta"):
        ref = diffusers.SanaTransformer2DModel(**raw)
    state = {k: torch.empty(v.shape, device="meta") for k, v in ref.state_dict().items()}
    inferred = config_from_official(_to_official(state))
    assert inferred == config
