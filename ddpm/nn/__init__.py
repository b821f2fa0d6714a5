"""The DDPM U-Net and its layers."""

from ddpm.nn.unet import UNET_CONFIGS, ModelConfig, UNet, UNetConfig, build_unet

__all__ = ["UNET_CONFIGS", "ModelConfig", "UNet", "UNetConfig", "build_unet"]
