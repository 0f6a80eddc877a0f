"""The segmentation networks a run can train, by architecture name: how to validate its options, build it (with
its ImageNet weights when a path is given) and rebuild it from a saved model file.

`deeplabv2` is params `model` (every default row); another architecture is named by a network of params
`networks` (`mit_daformer`: a MiT encoder with the DAFormer head, the mean-teacher family's network).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from plca.config import ConfigError, from_dict, to_dict
from plca.models.daformer import DAFormer, DAFormerConfig, build_daformer
from plca.models.deeplabv2 import DeepLabV2, DeepLabV2Config, build_model
from plca.models.output import SegmentationModel

DEFAULT_ARCH = "deeplabv2"


@dataclass(frozen=True)
class Arch:
    """One architecture: its options' dataclass, its builder (ImageNet weights loaded when configured) and its
    class (built without weights, to load a saved state_dict)."""

    config: type
    build: Callable[[Any], SegmentationModel]
    network: type[SegmentationModel]


ARCHS: dict[str, Arch] = {
    DEFAULT_ARCH: Arch(DeepLabV2Config, build_model, DeepLabV2),
    "mit_daformer": Arch(DAFormerConfig, build_daformer, DAFormer),
}


def arch(name: str, where: str = "arch") -> Arch:
    if name not in ARCHS:
        raise ConfigError(f"{where}: unknown architecture '{name}'; known: {sorted(ARCHS)}")
    return ARCHS[name]


def network_config(name: str, options: dict[str, Any], where: str) -> Any:
    """The options of a network of architecture `name`, validated (errors name `where` and the key)."""
    return from_dict(arch(name, where).config, options, where)


def arch_of(model: SegmentationModel) -> str:
    """The architecture name of a built network."""
    for name, a in ARCHS.items():
        if type(model) is a.network:
            return name
    raise TypeError(f"{type(model).__name__} is not a network of plca.models.networks.ARCHS")


def saved_config(model: SegmentationModel) -> dict[str, Any]:
    """What a model file records of the network: its options (and its architecture unless the default, so the
    files of DeepLab models stay as they always were)."""
    state: dict[str, Any] = {"model_config": to_dict(model.cfg)}
    name = arch_of(model)
    if name != DEFAULT_ARCH:
        state["arch"] = name
    return state


def from_saved(state: dict[str, Any]) -> SegmentationModel:
    """The network a model file describes (`saved_config` + "state_dict"), its weights loaded; no ImageNet
    weights are read."""
    a = arch(state.get("arch", DEFAULT_ARCH), "model file")
    cfg = replace(a.config(**state["model_config"]), pretrained=None)
    model = a.network(cfg)
    model.load_state_dict(state["state_dict"])
    return model
