"""SegNext ViT-B SAx2 (HQ) re-implemented in PyTorch, for benchmark models with random weights.

The real checkpoint (`vitb_sa2_cocolvis_hq44k_epoch_0.pth`) cannot be downloaded here, but timing the
backend needs models of the true size and shape.  This module reproduces the architecture described in
docs/segnext.md.  Attribute names follow the official state-dict keys (`backbone.blocks.3.attn.qkv`,
`neck.down_4.0`, `head.convs.2.conv`, ...), so that upstream's checkpoints load into `SegNextModel` with
`strict=True` (tools/convert_checkpoint.py does that).

Two export wrappers mirror the public ONNX pair:
  SegNextEncoder: image 1x3x1024x1024 in [0, 1]              -> image_feats 1x768x64x64   (once per image)
  SegNextDecoder: image_feats, point_coords 1xNx2, point_labels 1xN, prev_mask 1x1x1024x1024
                                                              -> mask logits 1x1x1024x1024 (once per click)

Depth is configurable (`SegNextConfig.shallow()`) so tests can build a cheap variant; the default
configuration is the full-size model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Parameter counts per part stated in docs/segnext.md (millions), used to check that the architecture is right.
EXPECTED_PARAMS_M = {
    "backbone": 88.79,
    "fusion": 14.18,
    "neck": 9.48,
    "head": 0.76,
    "prompt_embedding": 0.59,
}


@dataclass(frozen=True)
class SegNextConfig:
    image_size: int = 1024  # the model always works in a 1024x1024 frame
    patch_size: int = 16  # -> 64x64 tokens
    embed_dim: int = 768
    num_heads: int = 12
    mlp_hidden: int = 3072
    encoder_depth: int = 12
    global_block_indices: tuple[int, ...] = (2, 5, 8, 11)  # the rest use windowed attention
    window_size: int = 16  # in tokens: 64x64 tokens -> 4x4 = 16 windows
    num_fusion_blocks: int = 2
    click_radius: float = 5.0  # px in the 1024 frame, whatever the image size
    neck_out_dims: tuple[int, int, int, int] = (128, 256, 512, 1024)  # strides 4, 8, 16, 32
    head_channels: int = 256
    # Backbone LayerNorms use 1e-6 (timm ViT); the fusion blocks use nn.LayerNorm's default 1e-5.
    backbone_ln_eps: float = 1e-6
    fusion_ln_eps: float = 1e-5

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def shallow(cls) -> "SegNextConfig":
        """Same widths and resolutions, fewer blocks: one windowed + one global encoder block, one fusion block.

        Every kind of layer is still exercised, so export/numerics tests cover the whole graph cheaply.
        """
        return cls(encoder_depth=2, global_block_indices=(1,), num_fusion_blocks=1)


# --------------------------------------------------------------------------------------------------
# Transformer blocks (timm-style layout: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, C). Plain matmul + softmax rather than F.scaled_dot_product_attention: it exports to
        # the same ONNX ops on every exporter and materialises the full attention matrix, like the
        # published ONNX model does (that matrix is what dominates memory and time).
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # Scaling q before the product is the same maths as scaling the NxN scores, on 64x fewer values.
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, not the tanh approximation
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C). H and W are multiples of ws (64 / 16): no padding."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // ws) * (w // ws), ws * ws, c)


def window_unpartition(x: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    """Inverse of window_partition."""
    c = x.shape[-1]
    x = x.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class Block(nn.Module):
    """Pre-norm ViT block on a (B, H, W, C) token grid; window_size=None means global attention."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float, window_size: int | None):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window_size is None:
            y = self.attn(y.reshape(b, h * w, c)).reshape(b, h, w, c)
        else:
            # No shift, no padding, no relative position bias: windows are fully independent.
            y = window_partition(y, self.window_size)
            y = window_unpartition(self.attn(y), self.window_size, b, h, w)
        x = x + y
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------------
# Backbone and prompt embedding
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv 16x16 stride 16. Used both for the image (backbone.patch_embed.proj) and for the click/mask
    prompt (visual_prompts_encoder.proj), hence the shared `.proj` name."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, C, H/16, W/16)


class ViTBackbone(nn.Module):
    def __init__(self, cfg: SegNextConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(3, cfg.embed_dim, cfg.patch_size)
        # The checkpoint has 1 + 64*64 slots (an MAE-style layout with a cls slot); slot 0 is never used.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid_size**2, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                cfg.num_heads,
                cfg.mlp_hidden,
                cfg.backbone_ln_eps,
                window_size=None if i in cfg.global_block_indices else cfg.window_size,
            )
            for i in range(cfg.encoder_depth)
        )
        # Present in the checkpoint (and counted in its 88.79 M) but never applied: the encoder output is
        # the raw token grid.  Kept so load_state_dict(strict=True) works.
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.backbone_ln_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image (B, 3, 1024, 1024) -> tokens (B, 64, 64, 768)."""
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, 64, 64, C)
        b, h, w, c = x.shape
        x = x + self.pos_embed[:, 1:].reshape(1, h, w, c)
        for blk in self.blocks:
            x = blk(x)
        return x


# --------------------------------------------------------------------------------------------------
# SimpleFPN neck and segmentation head
# --------------------------------------------------------------------------------------------------


class SimpleFPN(nn.Module):
    """ViTDet/SimpleClick-style neck: one 64x64 map -> strides 4, 8, 16, 32.

    GroupNorm with a single group everywhere.  The Sequential layouts (and hence the parameter indices in
    the state dict) are exactly those listed in docs/segnext.md, so GELU/GroupNorm positions matter.
    """

    def __init__(self, in_dim: int, out_dims: tuple[int, int, int, int]):
        super().__init__()
        c4 = max(out_dims[0] * 2, in_dim // 2)  # 384
        self.down_4 = nn.Sequential(
            nn.ConvTranspose2d(in_dim, c4, 2, stride=2),  # 0
            nn.GroupNorm(1, c4),  # 1
            nn.GELU(),  # 2
            nn.ConvTranspose2d(c4, c4 // 2, 2, stride=2),  # 3
            nn.GroupNorm(1, c4 // 2),  # 4 (no GELU after it)
            nn.Conv2d(c4 // 2, out_dims[0], 1),  # 5
            nn.GroupNorm(1, out_dims[0]),  # 6
            nn.GELU(),  # 7
        )
        c8 = max(out_dims[1], in_dim // 2)  # 384
        self.down_8 = nn.Sequential(
            nn.ConvTranspose2d(in_dim, c8, 2, stride=2),  # 0
            nn.GroupNorm(1, c8),  # 1
            nn.Conv2d(c8, out_dims[1], 1),  # 2
            nn.GroupNorm(1, out_dims[1]),  # 3
            nn.GELU(),  # 4
        )
        self.down_16 = nn.Sequential(
            nn.Conv2d(in_dim, out_dims[2], 1),  # 0
            nn.GroupNorm(1, out_dims[2]),  # 1
            nn.GELU(),  # 2
        )
        c32 = max(out_dims[3], in_dim * 2)  # 1536
        self.down_32 = nn.Sequential(
            nn.Conv2d(in_dim, c32, 2, stride=2),  # 0
            nn.GroupNorm(1, c32),  # 1
            nn.Conv2d(c32, out_dims[3], 1),  # 2
            nn.GroupNorm(1, out_dims[3]),  # 3
            nn.GELU(),  # 4
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.down_4(x), self.down_8(x), self.down_16(x), self.down_32(x)]


class ConvReLU(nn.Module):
    """1x1 conv with bias + ReLU; the `.conv` attribute matches the checkpoint's `head.convs.{i}.conv`."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class SegHead(nn.Module):
    """Per-level 1x1 conv -> 256 + ReLU, upsample to the stride-4 size, concat, 1x1 fuse + ReLU, 1x1 -> 1."""

    def __init__(self, in_dims: tuple[int, ...], channels: int):
        super().__init__()
        self.convs = nn.ModuleList(ConvReLU(c, channels) for c in in_dims)
        self.fusion_conv = ConvReLU(channels * len(in_dims), channels)
        self.dropout = nn.Dropout2d(0.1)  # training only; identity in eval mode and absent from the ONNX
        self.seg_conv = nn.Conv2d(channels, 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]  # stride 4: 256x256
        outs = [self.convs[0](feats[0])]  # already at the target size: no identity Resize in the graph
        for conv, f in zip(self.convs[1:], feats[1:]):
            outs.append(F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False))
        x = self.fusion_conv(torch.cat(outs, dim=1))
        return self.seg_conv(self.dropout(x))


# --------------------------------------------------------------------------------------------------
# Whole model (checkpoint layout) and the two export wrappers
# --------------------------------------------------------------------------------------------------


class SegNextModel(nn.Module):
    """Container with exactly the checkpoint's top-level prefixes; forward is split across the wrappers."""

    def __init__(self, cfg: SegNextConfig | None = None, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg = cfg or SegNextConfig()
        self.backbone = ViTBackbone(cfg)
        self.visual_prompts_encoder = PatchEmbed(3, cfg.embed_dim, cfg.patch_size)
        self.fusion_blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden, cfg.fusion_ln_eps, window_size=None)
            for _ in range(cfg.num_fusion_blocks)
        )
        self.neck = SimpleFPN(cfg.embed_dim, cfg.neck_out_dims)
        self.head = SegHead(cfg.neck_out_dims, cfg.head_channels)
        if seed is not None:
            random_init_(self, seed)
        self.eval()

    def param_counts(self) -> dict[str, int]:
        """Parameters per part, keyed like EXPECTED_PARAMS_M."""

        def count(*mods: nn.Module) -> int:
            return sum(p.numel() for m in mods for p in m.parameters())

        return {
            "backbone": count(self.backbone),
            "fusion": count(self.fusion_blocks),
            "neck": count(self.neck),
            "head": count(self.head),
            "prompt_embedding": count(self.visual_prompts_encoder),
        }


@torch.no_grad()
def random_init_(model: nn.Module, seed: int = 0) -> None:
    """Deterministic random weights whose activations stay O(1) through the whole graph.

    Linear layers and the position embedding: truncated normal std 0.02 (the ViT/MAE convention, so the
    transformer behaves like a trained one numerically: small residual updates).  Convolutions: truncated
    normal with std 1/sqrt(fan_in), so the neck/head keep unit scale and the logits are O(1) rather than
    vanishingly small (tiny values would make the ONNX-vs-PyTorch comparison meaningless and could hit slow
    denormal arithmetic in timing).  Biases zero, norms weight 1 / bias 0.
    """
    gen = torch.Generator().manual_seed(seed)

    def trunc_normal(t: torch.Tensor, std: float) -> None:
        # Own sampler (not nn.init) so the generator, and hence the weights, are fully reproducible.
        t.copy_(torch.randn(t.shape, generator=gen).clamp_(-2.0, 2.0) * std)

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            trunc_normal(m.weight, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            k = m.kernel_size[0] * m.kernel_size[1]
            s = m.stride[0] * m.stride[1]
            # A transposed conv with kernel == stride feeds each output pixel from in_channels*k/s inputs.
            fan_in = m.in_channels * k // (s if isinstance(m, nn.ConvTranspose2d) else 1)
            trunc_normal(m.weight, 1.0 / math.sqrt(fan_in))
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in model.named_parameters(recurse=True):
        if name.endswith("pos_embed"):
            trunc_normal(p, 0.02)


class SegNextEncoder(nn.Module):
    """image (B, 3, 1024, 1024), RGB in [0, 1] -> image_feats (B, 768, 64, 64)."""

    def __init__(self, model: SegNextModel):
        super().__init__()
        self.backbone = model.backbone  # shared, so state-dict keys stay `backbone.*`
        # Not persistent: the checkpoint has no such buffers, and load_state_dict must stay strict.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std  # normalisation lives in the graph: callers feed RGB/255
        tokens = self.backbone(x)  # (B, 64, 64, C); no final norm (fc_norm is unused upstream)
        return tokens.permute(0, 3, 1, 2).contiguous()


def rasterise_clicks(
    point_coords: torch.Tensor, point_labels: torch.Tensor, size: int, radius: float
) -> torch.Tensor:
    """Clicks -> (B, 2, size, size) binary disks: channel 0 positives (label 1), channel 1 negatives (label 0).

    point_coords (B, N, 2) holds (x, y) in the size x size frame, pixel i at coordinate i; label -1 is
    padding and is ignored.  Written with broadcasting and a min over the click axis only, so it exports
    with a dynamic N (memory is N x size x size floats, 4 MB per click at 1024, which is fine).
    """
    b = point_coords.shape[0]
    # A padding click is appended so the min over clicks never runs over an empty axis (N = 0 works too).
    point_coords = torch.cat([point_coords, point_coords.new_zeros(b, 1, 2)], dim=1)
    point_labels = torch.cat([point_labels, point_labels.new_full((b, 1), -1.0)], dim=1)

    grid = torch.arange(size, dtype=point_coords.dtype, device=point_coords.device)
    x = point_coords[:, :, 0].unsqueeze(-1).unsqueeze(-1)  # (B, N, 1, 1)
    y = point_coords[:, :, 1].unsqueeze(-1).unsqueeze(-1)
    dx = grid.view(1, 1, 1, size) - x  # (B, N, 1, S)
    dy = grid.view(1, 1, size, 1) - y  # (B, N, S, 1)
    dist2 = dx * dx + dy * dy  # (B, N, S, S)

    far = dist2.new_tensor(1e10)  # distance given to clicks of the other polarity or padding
    labels = point_labels.unsqueeze(-1).unsqueeze(-1)  # (B, N, 1, 1)
    disks = []
    for polarity in (1.0, 0.0):
        d = torch.where(labels == polarity, dist2, far).amin(dim=1)  # (B, S, S): nearest click of this kind
        disks.append((d <= radius * radius).to(point_coords.dtype))  # closed disk, as upstream's DistMaps
    return torch.stack(disks, dim=1)


class SegNextDecoder(nn.Module):
    """(image_feats, point_coords, point_labels, prev_mask) -> mask logits (B, 1, 1024, 1024)."""

    def __init__(self, model: SegNextModel):
        super().__init__()
        self.cfg = model.cfg
        # Shared submodules, attribute names = checkpoint prefixes.
        self.visual_prompts_encoder = model.visual_prompts_encoder
        self.fusion_blocks = model.fusion_blocks
        self.neck = model.neck
        self.head = model.head

    def forward(
        self,
        image_feats: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        prev_mask: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        disks = rasterise_clicks(point_coords, point_labels, cfg.image_size, cfg.click_radius)
        prompt = torch.cat([prev_mask, disks], dim=1)  # [prev_mask, pos_disks, neg_disks]
        x = image_feats + self.visual_prompts_encoder(prompt)  # (B, C, 64, 64)
        x = x.permute(0, 2, 3, 1)  # token grid (B, 64, 64, C)
        for blk in self.fusion_blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        logits = self.head(self.neck(x))  # (B, 1, 256, 256)
        return F.interpolate(
            logits, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=True
        )
