"""The fully convolutional discriminator of AdaptSegNet (Tsai et al. CVPR 2018) and ADVENT (Vu et al. CVPR 2019).

Both released codes use the same network: five 4x4 convs of stride 2 and padding 1 with biases, channels
C -> ndf -> 2 ndf -> 4 ndf -> 8 ndf -> 1 (ndf = 64), LeakyReLU(0.2) after the first four and nothing after the
last, no normalisation, PyTorch's default initialisation. Its output is a map of logits [N, 1, h, w], h = H halved
(floored) five times (16 x 32 for a 512 x 1024 input); the losses average over all its entries. AdaptSegNet's
paper upsamples that map to the input size; its code does not, nor does this.
"""

from __future__ import annotations

from torch import nn

LEAKY_SLOPE = 0.2


def fc_discriminator(num_classes: int, ndf: int = 64) -> nn.Sequential:
    """[N, num_classes, H, W] map -> [N, 1, h, w] logits; layers [conv, lrelu] x 4 + conv.

    The layout is ADVENT's `get_fc_discriminator`, so state_dict keys are 0.*, 2.*, 4.*, 6.*, 8.*; AdaptSegNet's
    conv1 .. conv4, classifier map onto them in that order.
    """
    if num_classes < 1 or ndf < 1:
        raise ValueError(f"fc_discriminator needs num_classes >= 1 and ndf >= 1, got {num_classes} and {ndf}")
    channels = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8, 1]
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        layers.append(nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1, bias=True))
        if i < len(channels) - 2:
            layers.append(nn.LeakyReLU(negative_slope=LEAKY_SLOPE))
    return nn.Sequential(*layers)
