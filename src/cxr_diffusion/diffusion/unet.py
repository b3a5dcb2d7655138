"""The UNet factory: a diffusers ``UNet2DConditionModel`` from a typed config."""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from cxr_diffusion.config import UNetConfig


def build_unet(config: UNetConfig, sample_size: int, channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """Cross-attention (with self-attention) only on the levels ``config.cross_attention`` enables;
    plain ResNet blocks elsewhere. The mid block always attends (it is the smallest feature map). With
    ``config.timestep_condition`` the pooled condition is also projected and added to the timestep
    embedding (diffusers' ``class_embed_type="projection"``), so every ResNet block sees it."""
    down = tuple("CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in config.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if attend else "UpBlock2D" for attend in reversed(config.cross_attention))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        class_embed_type="projection" if config.timestep_condition else None,
        projection_class_embeddings_input_dim=cross_attention_dim if config.timestep_condition else None,
    )


def sd15_unet_config() -> UNetConfig:
    """Stable Diffusion 1.5's UNet shape, as the reference work trained it from scratch."""
    return UNetConfig(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                      cross_attention=(True, True, True, False), attention_head_dim=8, norm_num_groups=32,
                      cross_attention_dim=768, timestep_condition=False)
