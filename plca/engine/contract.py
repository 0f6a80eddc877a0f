"""What a method is to the engine: its networks, one optimiser per trained network, an optional EMA teacher,
the state it must resume, and one training step (batches in, the objective and named scalars out).

The engine imports this module and never a method; methods import it. A method never opens a file and never knows
the dataset: it receives batches keyed by stream ("source_image", "source_label", "target_image", ...) and returns
the objective to minimise. Methods with several networks (an AdaptSegNet/ADVENT discriminator) list them in
`networks()` and give each trained one its optimiser settings in `optimizers()`; their step returns the sum of the
losses of all networks, each term built so that it reaches only its own network's parameters. Rounds of
pseudo-labels are DVC stages, not something a method does between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from plca.engine.distributed import LOCAL, Reducer
from plca.engine.optim import OptimConfig


@dataclass
class StepOutput:
    """The objective of one micro-batch and the named scalars to log (already detached floats)."""

    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainContext:
    """What the engine tells a method before each optimiser step."""

    device: torch.device
    step: int
    total_steps: int


@dataclass
class EMASpec:
    """A teacher network that follows a student by an exponential moving average of its parameters
    (`plca.models.ema_update_`, Mean Teacher; DACS/DAFormer). `before_step`: updated before step t's forward
    with the step t (DAFormer: alpha 0 at step 0 copies the student); else after the optimiser step (DACS)."""

    student: str
    alpha_max: float = 0.999
    before_step: bool = True


class Method:
    """Base class: a segmentation network `model` trained by one optimiser. Subclasses override `training_step`,
    and `networks`/`optimizers`/`teachers`/`state_dict` when they have more to train or to keep."""

    name: ClassVar[str] = "method"
    #: The streams the engine must feed: "source" (images with labels), "target" (images only).
    streams: ClassVar[tuple[str, ...]] = ("source",)

    def __init__(self, model: nn.Module, cfg: Any = None) -> None:
        self.model = model
        #: The method's options, validated against its config dataclass (`plca.methods.build_method`).
        self.cfg = cfg
        #: How its batch means are normalised over several processes; the engine sets it (`engine.normalise`).
        self.reducer: Reducer = LOCAL

    @classmethod
    def model_options(cls, cfg: Any) -> dict[str, Any]:
        """Options of the segmentation network (`plca.models.DeepLabV2Config` fields) this method needs on top of
        params `model`, given its options `cfg`: e.g. {"aux_head": True} for multi-level training. A run whose
        starting model lacks such a part (the shared source-only model has no auxiliary head) gets it freshly
        initialised, as the released codes initialise heads. None by default."""
        del cfg
        return {}

    @classmethod
    def rare_class_sampling(cls, cfg: Any) -> Any:
        """How the source stream samples its images: a `plca.data.rcs.RCSConfig` (DAFormer's rare class sampling,
        from the class statistics the pipeline computes once), or None: uniformly, as every other method."""
        del cfg
        return None

    def set_normalization(self, transform: Any) -> None:
        """Told the input normalisation (`plca.data.TransformConfig`) before training, for a method that works on
        pixel values (the mean teacher's colour jitter); most methods ignore it."""
        del transform

    def set_pseudo_labels(self, summary: dict[str, Any]) -> None:
        """Told the summary of a round's pseudo-label set (`plca.labelling`: its policy's options and decisions,
        e.g. the class thresholds) before training, for a method whose loss needs them (TPLD's bootstrapping);
        most methods ignore it."""
        del summary

    def networks(self) -> dict[str, nn.Module]:
        """Every network the method holds (all are checkpointed and put in train mode by the engine)."""
        return {"model": self.model}

    def optimizers(self, base: OptimConfig) -> dict[str, OptimConfig]:
        """Network name -> the settings of its optimiser. `base` is the phase's optimiser (params `adapt.optim`,
        ...), the segmenter's; a discriminator brings its own from the method's options. The first entry is the
        segmenter's: its lr is logged as `lr`, the others' as `lr/<name>`."""
        return {"model": base}

    def teachers(self) -> dict[str, EMASpec]:
        """Network name -> the EMA rule of a teacher (no optimiser); none by default."""
        return {}

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def before_step(self, ctx: TrainContext) -> None:
        """Called before each optimiser step; most methods need nothing here."""

    def state_dict(self) -> dict[str, Any]:
        """What the method must resume beyond its networks and optimisers (e.g. a running statistic)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
