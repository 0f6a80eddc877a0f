"""Run a trained model of the pipeline on a folder of images: Cityscapes label-id PNGs (what the official evaluator,
`python -m plca.score` and benchmark submissions read) and colour overlays.

    python -m plca.predict MODEL IMAGES OUT [--params params.yaml] [--variant NAME] [--tta | --no-tta]
                           [--alpha A] [--input-size W H] [--device auto] [--no-progress]

MODEL: a model file the pipeline wrote (`models/<variant>/s<seed>/model.pt`: its architecture travels with it; an
ensemble too). IMAGES: a folder, searched recursively for .png, .jpg and .jpeg files of any size. OUT gets
`labelIds/<path>.png` (label ids) and `color/<path>.png` (the image and its prediction, half and half), `<path>` the
image's path below IMAGES. Normalisation: params `data.train_transform` (the model was trained with it). Test-time
aggregation and its alpha: as the model's variant is evaluated (the variant: `--variant`, else the folder name
`models/<variant>/...`), unless `--tta`, `--no-tta` or `--alpha` say otherwise. Each image is resized to
`--input-size` (default: params `data.eval_size`; none: as it is) and its prediction brought back to its size.
Exit status 0, or 2 on bad input with a message naming it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from plca.config import ConfigError
from plca.data.datasets import DataError, Sample, read_rgb
from plca.data.labels import TRAINID_TO_ID, colorize
from plca.data.transforms import eval_transform
from plca.engine.trainer import resolve_device
from plca.evaluation.inference import InferenceConfig, predict_probs
from plca.experiment import inference_config, load_model
from plca.io import atomic_write_png
from plca.models.deeplabv2 import DeepLabV2
from plca.models.output import class_argmax
from plca.params import load_params

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m plca.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a model file of the pipeline (models/<variant>/s<seed>/model.pt)")
    p.add_argument("images", type=Path, help="a folder of images (searched recursively)")
    p.add_argument("out", type=Path, help="output folder: labelIds/ and color/")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    p.add_argument("--variant", help="the model's variant (default: the folder name models/<variant>/...)")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None, help="test-time aggregation on")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="test-time aggregation off")
    p.add_argument("--alpha", type=float, help="the aggregation weight (default: the variant's)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("W", "H"), help="network input size")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _variant(model: Path, given: str | None, known: Sequence[str]) -> str | None:
    if given is not None:
        if given not in known:
            raise ValueError(f"--variant: no variant '{given}' in params; defined: {sorted(known)}")
        return given
    guess = model.resolve().parent.parent.name  # models/<variant>/s<seed>/model.pt
    return guess if guess in known else None


def predict_folder(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        params = load_params(args.params)
        variant = _variant(args.model, args.variant, list(params.variants))
        if not args.model.is_file():
            raise FileNotFoundError(f"{args.model}: no such model file")
        if not args.images.is_dir():
            raise FileNotFoundError(f"{args.images}: no such folder of images")
        images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise FileNotFoundError(f"{args.images}: no {', '.join(IMAGE_SUFFIXES)} images below it")
        # as the pipeline scores the variant (an unknown one: no aggregation, evaluate's alpha), then the flags
        cfg = (inference_config(params, variant) if variant is not None else
               InferenceConfig(alpha=params.evaluate.test_time_alpha, input_size=params.data.eval_size))
        cfg = replace(cfg, batch_size=1, **{k: v for k, v in (("test_time_aggregation", args.tta),
                                                               ("alpha", args.alpha)) if v is not None})
        if args.input_size:
            cfg = replace(cfg, input_size=tuple(args.input_size))
        device = resolve_device(args.device)
        model = load_model(args.model, device).eval()
        if cfg.test_time_aggregation and not isinstance(model, DeepLabV2):
            raise ValueError(f"{args.model}: an ensemble has no feature map to aggregate; use --no-tta")
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tta, alpha, size = cfg.test_time_aggregation, cfg.alpha, cfg.input_size
    tcfg = params.data.train_transform
    print(f"{args.model} ({variant or 'variant unknown'}): {len(images)} images, test-time aggregation "
          f"{'on, alpha ' + str(alpha) if tta else 'off'}, input {'as stored' if size is None else size}, {device}",
          file=sys.stderr)
    for path in tqdm(images, desc="predict", disable=args.no_progress, dynamic_ncols=True):
        try:
            image = read_rgb(path)
        except (DataError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        x, _ = eval_transform(Sample(image=image, label=None, name=path.stem), tcfg, size)
        probs = predict_probs(model, torch.from_numpy(x)[None].to(device), image.shape[:2], cfg)
        train_ids = class_argmax(probs)[0].to(torch.uint8).cpu().numpy()
        rel = path.relative_to(args.images).with_suffix(".png")
        atomic_write_png(TRAINID_TO_ID[train_ids], args.out / "labelIds" / rel)
        overlay = (image.astype(np.uint16) + colorize(train_ids)) // 2
        atomic_write_png(cv2.cvtColor(overlay.astype(np.uint8), cv2.COLOR_RGB2BGR), args.out / "color" / rel)
    print(f"wrote {args.out / 'labelIds'} and {args.out / 'color'}", file=sys.stderr)
    return 0


def main() -> None:
    sys.exit(predict_folder())


if __name__ == "__main__":
    main()
