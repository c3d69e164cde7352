"""The backend's masks are upstream SegNext's, click for click.

`UpstreamPredictor` below is an independent reference of upstream's predictor (its `BasePredictor.predict`
and `PlainVitModel.get_prompt_feats` / `postprocess`, docs/segnext.md), written with torch for every resize
and upstream's own expressions, run on the shallow SegNext export (random weights, true widths). The backend
answers the same clicks over HTTP (the Flask app, Label Studio's request shape). Masks must agree up to float
rounding: IoU >= 0.9999 per click; the number of differing pixels is printed (`pytest -s`).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import decode_region, encode_png, iou, keypoint, make_scene, predict_body

torch = pytest.importorskip("torch")
F = torch.nn.functional

TARGET_LENGTH = 1024
PRED_THRESHOLD = 0.49  # upstream's evaluate_sample: pred_mask = pred_probs > pred_thr


class UpstreamPredictor:
    """Upstream's inference steps on the ONNX pair, as its PyTorch code runs them."""

    def __init__(self, encoder_path, decoder_path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.encoder = ort.InferenceSession(str(encoder_path), options, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(decoder_path), options, providers=["CPUExecutionProvider"])

    def set_image(self, rgb: np.ndarray) -> None:
        image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255  # torchvision's ToTensor
        self.orig_size = image.shape[-2:]
        self.prev_mask = torch.zeros_like(image)[:, :1]
        # preprocess: the stretch (the ImageNet normalisation is inside the exported encoder).
        resized = F.interpolate(image, TARGET_LENGTH, mode="bilinear", align_corners=False)
        self.image_feats = self.encoder.run(["image_feats"], {"image": resized.numpy()})[0]

    def predict(self, clicks: list[tuple[int, int, bool]]) -> np.ndarray:
        """clicks: (row, column, positive) pixel indices, oldest first -> the probability at the image's size."""
        prev_mask = F.interpolate(self.prev_mask, TARGET_LENGTH, mode="bilinear", align_corners=False)
        points = torch.tensor([[row, col, index] for index, (row, col, _) in enumerate(clicks)])  # int64, as upstream
        coords = []
        for point in points:
            w, h = point[0], point[1]  # upstream's names: row, column
            w = int(w * (TARGET_LENGTH / self.orig_size[0]) + 0.5)
            h = int(h * (TARGET_LENGTH / self.orig_size[1]) + 0.5)
            coords.append((h, w))  # the export takes (x, y)
        logits = self.decoder.run(
            ["mask"],
            {
                "image_feats": self.image_feats,
                "point_coords": np.array([coords], np.float32),
                "point_labels": np.array([[1.0 if positive else 0.0 for _, _, positive in clicks]], np.float32),
                "prev_mask": prev_mask.numpy(),
            },
        )[0]
        # postprocess, then the sigmoid kept as the next click's prev_mask.
        prediction = torch.sigmoid(F.interpolate(torch.from_numpy(logits), self.orig_size, mode="bilinear", align_corners=False))
        self.prev_mask = prediction
        return prediction[0, 0].numpy()


def label_studio_point(row: int, col: int, width: int, height: int, positive: bool) -> dict:
    """The keypoint Label Studio sends for a click on pixel (row, col): its centre in percent; the last pixel
    of a side as 100 %, the far edge."""
    x = 100.0 if col == width - 1 else (col + 0.5) / width * 100
    y = 100.0 if row == height - 1 else (row + 0.5) / height * 100
    point = keypoint(x, y, width, height)
    point["is_positive"] = positive
    return point


# (width, height, clicks as (row, column, positive)): the far edges and corners of a 12 MP image (its last
# pixels land on 1024); odd pixels of a 2048 px side, which land exactly on half a model pixel (rounded up,
# where rint would round to even); a 640 px side, where the pixel index and the continuous position give
# different model pixels.
SCENARIOS = {
    "4000x3000 edges": (4000, 3000, [(1500, 2000, True), (2999, 3999, True), (0, 0, False), (2999, 0, False)]),
    "2048x2048 halves": (2048, 2048, [(1025, 1023, True), (2047, 2047, False), (301, 1, True)]),
    "640x480": (640, 480, [(240, 322, True), (2, 7, False), (479, 639, True)]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_masks_are_upstreams_click_for_click_and_replay_gives_the_same(name, make_client, shallow_segnext, image_server):
    width, height, clicks = SCENARIOS[name]
    client, _ = make_client(models=shallow_segnext[1:])
    scene = make_scene(width, height, seed=width + height)
    path = image_server.add(f"/data/upload/1/{width}x{height}.png", encode_png(scene.pixels))
    upstream = UpstreamPredictor(*shallow_segnext[1:])
    upstream.set_image(scene.pixels)

    points = [label_studio_point(row, col, width, height, positive) for row, col, positive in clicks]
    answers = []
    for k in range(1, len(clicks) + 1):
        expected = upstream.predict(clicks[:k]) > PRED_THRESHOLD
        response = client.post("/predict", json=predict_body(path, points[:k]))
        assert response.status_code == 200, response.json
        regions = response.json["results"][0]["result"]
        got = decode_region(regions[0], width, height) if regions else np.zeros((height, width), bool)
        answers.append(regions[0]["value"]["rle"] if regions else None)
        differing = int((got != expected).sum())
        print(f"{name}, click {k}: {differing} of {width * height} pixels differ, IoU {iou(got, expected):.6f}")
        # The random model's masks have a long boundary: neither empty nor everything.
        assert 0.05 < expected.mean() < 0.95
        assert iou(got, expected) >= 0.9999, (name, k, differing)

    if name == "4000x3000 edges":
        # The object's states are evicted (a restart, memory pressure): the whole sequence is replayed click
        # by click, and gives exactly what the clicks gave one at a time.
        from segnext_backend.runtime import get_runtime

        get_runtime().segmenter.object_states.clear()
        response = client.post("/predict", json=predict_body(path, points))
        assert response.json["results"][0]["result"][0]["value"]["rle"] == answers[-1]
