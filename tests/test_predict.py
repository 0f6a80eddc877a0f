"""`python -m plca.predict`: a pipeline model on a folder of images of any size -> label-id PNGs and overlays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from plca.data.datasets import Sample
from plca.data.labels import TRAINID_TO_ID
from plca.data.transforms import eval_transform
from plca.evaluation.inference import InferenceConfig, predict_probs
from plca.experiment import load_model, save_ensemble, save_model
from plca.models import DeepLabV2Config, build_model
from plca.params import load_params
from plca.predict import predict_folder

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
TINY = DeepLabV2Config(num_classes=19, depth=18, width=0.125, norm="group", groups=4, aspp_rates=(1, 2))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _images(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = {"a/one.png": rng.integers(0, 256, (40, 72, 3), dtype=np.uint8),
              "b/c/two.jpg": rng.integers(0, 256, (33, 50, 3), dtype=np.uint8)}
    for rel, image in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    (root / "notes.txt").write_text("not an image")
    return images


def _expected(model_path: Path, image_path: Path, tta: bool) -> np.ndarray:
    params = load_params(PARAMS)
    model = load_model(model_path).eval()
    image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
    x, _ = eval_transform(Sample(image, None, "x"), params.data.train_transform, params.data.eval_size)
    cfg = InferenceConfig(test_time_aggregation=tta, alpha=0.5, batch_size=1)
    probs = predict_probs(model, torch.from_numpy(x)[None], image.shape[:2], cfg)
    return TRAINID_TO_ID[probs.argmax(1)[0].numpy()]


def test_predicts_label_ids_at_each_image_size_with_the_variants_aggregation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model_path = tmp_path / "models" / "plca" / "s0" / "model.pt"  # variant plca: aggregated at test time
    save_model(build_model(TINY), model_path, {})
    images = _images(tmp_path / "in")
    for flag, tta in (([], True), (["--no-tta"], False)):
        out = tmp_path / f"out{len(flag)}"
        assert predict_folder([str(model_path), str(tmp_path / "in"), str(out), "--params", str(PARAMS),
                               "--no-progress", *flag]) == 0
        for rel, image in images.items():
            rel_png = Path(rel).with_suffix(".png")
            ids = cv2.imread(str(out / "labelIds" / rel_png), cv2.IMREAD_UNCHANGED)
            assert ids.shape == image.shape[:2] and set(np.unique(ids)) <= set(TRAINID_TO_ID.tolist())
            np.testing.assert_array_equal(ids, _expected(model_path, tmp_path / "in" / rel, tta))
            assert cv2.imread(str(out / "color" / rel_png)).shape == image.shape
        assert sorted(p.relative_to(out / "labelIds").as_posix() for p in (out / "labelIds").rglob("*.png")) == [
            "a/one.png", "b/c/two.png"]


def test_bad_input_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_model(build_model(TINY), a, {})
    save_model(build_model(TINY), b, {})
    (tmp_path / "empty").mkdir()
    common = ["--params", str(PARAMS), "--no-progress"]
    assert predict_folder([str(a), str(tmp_path / "empty"), str(tmp_path / "o"), *common]) == 2
    assert "empty: no .png, .jpg, .jpeg images below it" in capsys.readouterr().err
    _images(tmp_path / "in")
    assert predict_folder([str(a), str(tmp_path / "in"), str(tmp_path / "o"), "--variant", "nope", *common]) == 2
    assert "--variant: no variant 'nope'" in capsys.readouterr().err
    save_ensemble([a, b], (0.5, 0.5), tmp_path / "e.pt", {})
    assert predict_folder([str(tmp_path / "e.pt"), str(tmp_path / "in"), str(tmp_path / "o"), "--tta", *common]) == 2
    assert "an ensemble has no feature map" in capsys.readouterr().err
    assert predict_folder([str(tmp_path / "e.pt"), str(tmp_path / "in"), str(tmp_path / "o"), *common]) == 0
    assert predict_folder([str(tmp_path / "gone.pt"), str(tmp_path / "in"), str(tmp_path / "o"), *common]) == 2
    assert "gone.pt: no such model file" in capsys.readouterr().err
