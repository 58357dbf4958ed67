"""The segmentation network of Li et al. (MLMI 2019): a MONAI SegResNet for 4 MRI modalities -> 3 tumour regions."""

from __future__ import annotations

import torch
from monai.networks.nets import SegResNet


class BratsSegResNet(SegResNet):
    """SegResNet that remembers every constructor argument under the same attribute name.

    NVFlare's job exporter rebuilds the server-side model from the attributes of the instance handed to the recipe.
    MONAI's ``SegResNet`` does not keep ``out_channels`` (among others), so a bare instance would silently be rebuilt
    with MONAI's defaults (2 output channels). Storing the arguments makes the exported job build the identical model.

    ``init_seed`` makes the initial weights reproducible without touching the caller's random state: the server
    builds its own instance from the exported arguments, so seeding the process that builds the recipe would not
    reach the weights the federation actually starts from.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 16,
        in_channels: int = 4,
        out_channels: int = 3,
        dropout_prob: float = 0.2,
        blocks_down: tuple[int, ...] = (1, 2, 2, 4),
        blocks_up: tuple[int, ...] = (1, 1, 1),
        init_seed: int | None = None,
    ) -> None:
        blocks_down = tuple(int(b) for b in blocks_down)
        blocks_up = tuple(int(b) for b in blocks_up)
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            super().__init__(
                spatial_dims=spatial_dims,
                init_filters=init_filters,
                in_channels=in_channels,
                out_channels=out_channels,
                dropout_prob=dropout_prob,
                blocks_down=blocks_down,
                blocks_up=blocks_up,
            )
        # SegResNet already stores some of these; set them all so the set is complete whatever MONAI keeps.
        self.spatial_dims = spatial_dims
        self.init_filters = init_filters
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout_prob = dropout_prob
        self.blocks_down = blocks_down
        self.blocks_up = blocks_up
        self.init_seed = init_seed


def count_parameters(model) -> int:
    """Number of trainable parameters (4,702,227 for the paper's defaults)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
