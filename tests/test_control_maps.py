"""Control-map preprocessors through the app (`generate --control-type gray|scribble|depth|pose`) with the tiny
Z-Image model, a tiny ControlNet and tiny random annotators written by the test (transformers' save_pretrained
into a checkpoints folder, where the app looks for the downloaded ones): each map against an independent
computation (direct OpenCV calls; the transformers model evaluated here with its documented normalisation),
the first-use download from a loopback hub, and the offline message when the weights are missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from models import annotators as an
from tests.conftest import cli as main
from tests.test_controlnet_cli import gen, write_net

W, H = 64, 48  # not square: a swapped size would show


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Path:
    return write_net(tmp_path_factory.mktemp("cn") / "cn2.0", "2.0")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """Shapes on a gradient: contours for the edge maps, something for the depth model to see."""
    path = tmp_path_factory.mktemp("pictures") / "photo.png"
    y, x = np.mgrid[0:H, 0:W]
    arr = np.stack([x * 3, y * 4, np.full_like(x, 60)], axis=-1)
    arr[np.hypot(x - 30, y - 26) < 12] = (240, 230, 40)
    arr[6:18, 42:60] = (20, 20, 200)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def write_tiny_depth(folder: Path) -> Path:
    """A random Depth Anything (DINOv2 backbone, DPT head) a few hundred kB big, with its image processor as the
    published repository has it (keep aspect ratio, multiple of 14) at 56 px instead of 518."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(3)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                              neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                              depth_estimation_type="relative")
    DepthAnythingForDepthEstimation(cfg).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      resample=Image.BICUBIC).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """A checkpoints folder holding the tiny annotators where the app puts the downloaded ones."""
    root = tmp_path_factory.mktemp("ckpts")
    write_tiny_depth(an.Annotator(an.DEPTH_REPO).folder(root))
    return root


def run(tiny_dir, net, photo, out: Path, control_type: str, capsys, *extra: str):
    return main(capsys, *gen(tiny_dir, "--controlnet", str(net), "--control-image", str(photo), "--control-type",
                             control_type, "--width", str(W), "--height", str(H), "--output", str(out), *extra))


def saved_map(out: Path) -> np.ndarray:
    return np.asarray(Image.open(out.with_name(out.stem + "_control.png")).convert("RGB"))


def grey_of(photo: Path) -> np.ndarray:
    return cv2.cvtColor(np.asarray(Image.open(photo).convert("RGB")), cv2.COLOR_RGB2GRAY)


def test_gray_map_is_opencv_grey(tiny_dir, net, photo, tmp_path, capsys):
    out = tmp_path / "g.png"
    rc, _, err = run(tiny_dir, net, photo, out, "gray", capsys)
    assert rc == 0, err
    got, expected = saved_map(out), grey_of(photo)
    assert got.shape == (H, W, 3) and all(np.array_equal(got[:, :, c], expected) for c in range(3))


def test_scribble_map_is_thick_strokes_of_opencv_edges(tiny_dir, net, photo, tmp_path, capsys):
    out = tmp_path / "s.png"
    rc, _, err = run(tiny_dir, net, photo, out, "scribble", capsys)
    assert rc == 0, err
    # the documented recipe at this size (min side 48 < 512: sigma 1, 3 px pen), by direct OpenCV calls
    edges = cv2.Canny(cv2.GaussianBlur(grey_of(photo), (0, 0), 1.0), 50, 150)
    expected = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    got = saved_map(out)
    assert got.shape == (H, W, 3) and all(np.array_equal(got[:, :, c], expected) for c in range(3))
    assert set(np.unique(got)) == {0, 255} and (got[:, :, 0] > 0).sum() > edges.astype(bool).sum()  # thickened


def test_scribble_pen_grows_with_the_picture():
    from models.z_image.control_map import scribble_scale

    assert scribble_scale(512, 768) == (2.0, 5) and scribble_scale(1024, 1024) == (4.0, 9)
    assert scribble_scale(64, 48) == (1.0, 3)


def reference_depth(folder: Path, photo: Path) -> np.ndarray:
    """The tiny model evaluated directly: its processor's pixel values, the model's predicted depth, bicubic
    back to the picture's size, min-max to 0-255 in float64 (near = large disparity = bright)."""
    from transformers import DepthAnythingForDepthEstimation, DPTImageProcessor

    picture = Image.open(photo).convert("RGB")
    pixel_values = DPTImageProcessor.from_pretrained(folder)(images=picture, return_tensors="pt")["pixel_values"]
    model = DepthAnythingForDepthEstimation.from_pretrained(folder).eval()
    with torch.no_grad():
        depth = model(pixel_values=pixel_values).predicted_depth
    d = torch.nn.functional.interpolate(depth[:, None].double(), size=(H, W), mode="bicubic",
                                        align_corners=False)[0, 0].numpy()
    return np.round((d - d.min()) / (d.max() - d.min()) * 255)


def test_depth_map_is_the_models_normalised_depth(tiny_dir, net, photo, ckpts, tmp_path, capsys):
    out = tmp_path / "d.png"
    rc, _, err = run(tiny_dir, net, photo, out, "depth", capsys, "--checkpoints-dir", str(ckpts))
    assert rc == 0, err
    got = saved_map(out)
    expected = reference_depth(an.Annotator(an.DEPTH_REPO).folder(ckpts), photo)
    assert got.shape == (H, W, 3) and got.min() == 0 and got.max() == 255
    assert all(np.abs(got[:, :, c].astype(int) - expected).max() <= 1 for c in range(3))
    assert len(np.unique(got)) > 20  # a real map, not a flat one
    assert "control map" in err  # its progress bar


def test_missing_annotator_offline_is_one_clear_error_and_the_next_job_runs(tiny_dir, net, photo, tmp_path,
                                                                             capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty_ckpts"
    rc, _, err = run(tiny_dir, net, photo, tmp_path / "x.png", "depth", capsys, "--checkpoints-dir", str(empty))
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "loading" not in err  # told before the model loads
    assert "missing and cannot be downloaded: offline mode is on" in lines[0]
    assert f"{an.DEPTH_REPO}/resolve/main/model.safetensors" in err
    assert str(empty / "annotators" / "Depth-Anything-V2-Small-hf") in err
    rc, _, err = run(tiny_dir, net, photo, tmp_path / "y.png", "gray", capsys, "--checkpoints-dir", str(empty))
    assert rc == 0, err


def test_annotator_downloads_on_first_use_from_the_hub(tiny_dir, net, photo, ckpts, tmp_path, capsys,
                                                        monkeypatch):
    """The tiny depth annotator served by a loopback hub: the first job fetches its files (the app's downloader),
    the map is the one from the pre-installed copy, and a second job asks the hub nothing."""
    from huggingface_hub import constants

    from tests.test_downloads import FakeHub

    source = an.Annotator(an.DEPTH_REPO).folder(ckpts)
    hub = FakeHub({})
    hub.files = {f"/{an.DEPTH_REPO}/resolve/main/{name}": (source / name).read_bytes() for name in an.REPO_FILES}
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        fresh = tmp_path / "fresh"
        out = tmp_path / "dl.png"
        rc, _, err = run(tiny_dir, net, photo, out, "depth", capsys, "--checkpoints-dir", str(fresh))
        assert rc == 0, err
        assert "model file(s) missing" in err
        folder = an.Annotator(an.DEPTH_REPO).folder(fresh)
        assert all((folder / n).read_bytes() == (source / n).read_bytes() for n in an.REPO_FILES)
        assert sorted(p.name for p in folder.iterdir()) == sorted(an.REPO_FILES)  # no partial left behind
        reference = tmp_path / "ref.png"
        assert run(tiny_dir, net, photo, reference, "depth", capsys, "--checkpoints-dir", str(ckpts))[0] == 0
        assert np.array_equal(saved_map(out), saved_map(reference))
        asked = len(hub.requests)
        assert run(tiny_dir, net, photo, tmp_path / "again.png", "depth", capsys, "--checkpoints-dir",
                   str(fresh))[0] == 0
        assert len(hub.requests) == asked  # present: no request at all
    finally:
        hub.close()
        shutil.rmtree(tmp_path / "fresh", ignore_errors=True)


# ---------------------------------------------------------------- pose

COCO = ("nose", "l_eye", "r_eye", "l_ear", "r_ear", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist",
        "r_wrist", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle")
OPENPOSE = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip",
            "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")
# a standing figure on 512 x 512 (OpenPose's 4 px limbs and discs at this size), by OpenPose name
FIGURE = {"nose": (256, 80), "neck": (256, 140), "r_shoulder": (196, 140), "r_elbow": (150, 220),
          "r_wrist": (120, 300), "l_shoulder": (316, 140), "l_elbow": (362, 220), "l_wrist": (392, 300),
          "r_hip": (220, 300), "r_knee": (210, 400), "r_ankle": (205, 490), "l_hip": (292, 300),
          "l_knee": (302, 400), "l_ankle": (307, 490), "r_eye": (240, 66), "l_eye": (272, 66), "r_ear": (220, 80),
          "l_ear": (292, 80)}
# OpenPose's limbs by name with their colours (RGB), as its body drawing lists them
LIMBS = ((("neck", "r_shoulder"), (255, 0, 0)), (("neck", "l_shoulder"), (255, 85, 0)),
         (("r_shoulder", "r_elbow"), (255, 170, 0)), (("r_elbow", "r_wrist"), (255, 255, 0)),
         (("l_shoulder", "l_elbow"), (170, 255, 0)), (("l_elbow", "l_wrist"), (85, 255, 0)),
         (("neck", "r_hip"), (0, 255, 0)), (("r_hip", "r_knee"), (0, 255, 85)), (("r_knee", "r_ankle"), (0, 255, 170)),
         (("neck", "l_hip"), (0, 255, 255)), (("l_hip", "l_knee"), (0, 170, 255)),
         (("l_knee", "l_ankle"), (0, 85, 255)), (("neck", "nose"), (0, 0, 255)), (("nose", "r_eye"), (85, 0, 255)),
         (("r_eye", "r_ear"), (170, 0, 255)), (("nose", "l_eye"), (255, 0, 255)), (("l_eye", "l_ear"), (255, 0, 170)))


def test_coco_keypoints_become_openpose_with_a_neck():
    xy = {name: (10.0 * i, 5.0 * i + 1) for i, name in enumerate(COCO)}
    scores = np.full(17, 0.9)
    scores[COCO.index("l_wrist")] = 0.1  # not seen
    points = an.coco_to_openpose(np.array([xy[n] for n in COCO]), scores)
    assert len(points) == 18 and points[OPENPOSE.index("l_wrist")] is None
    neck = ((xy["l_shoulder"][0] + xy["r_shoulder"][0]) / 2, (xy["l_shoulder"][1] + xy["r_shoulder"][1]) / 2)
    assert points[OPENPOSE.index("neck")] == neck
    for name in set(OPENPOSE) - {"neck", "l_wrist"}:
        assert points[OPENPOSE.index(name)] == xy[name], name
    scores[COCO.index("r_shoulder")] = 0.0  # no neck without both shoulders
    assert an.coco_to_openpose(np.array([xy[n] for n in COCO]), scores)[1] is None


def test_skeleton_is_drawn_in_openpose_colours():
    person = [FIGURE[n] for n in OPENPOSE]
    canvas = np.asarray(an.draw_openpose([person], 512, 512))
    for (a, b), colour in LIMBS:
        (xa, ya), (xb, yb) = FIGURE[a], FIGURE[b]
        mid = canvas[round((ya + yb) / 2), round((xa + xb) / 2)]
        assert tuple(mid) == tuple(int(c * 0.6) for c in colour), (a, b, mid)  # limbs at 60 % of their colour
    openpose_colours = [colour for _, colour in LIMBS] + [(255, 0, 85)]  # keypoint i takes colour i
    for i, name in enumerate(OPENPOSE):
        x, y = FIGURE[name]
        assert tuple(canvas[y, x]) == openpose_colours[i], name
    assert canvas[5, 5].tolist() == [0, 0, 0] and canvas[300, 256].tolist() == [0, 0, 0]  # black elsewhere
    person[OPENPOSE.index("r_elbow")] = None  # an unseen keypoint drops its limbs
    canvas = np.asarray(an.draw_openpose([person], 512, 512))
    assert canvas[180, 173].tolist() == [0, 0, 0] and canvas[260, 135].tolist() == [0, 0, 0]


def write_tiny_pose(folder: Path) -> Path:
    """A random ViTPose (simple decoder, 17 COCO heatmaps) with its top-down image processor at 64 x 48."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    torch.manual_seed(4)
    backbone = VitPoseBackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, image_size=[64, 48], patch_size=[16, 16], out_indices=[2])
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, use_simple_decoder=True,
                                           num_labels=17)).save_pretrained(folder)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(folder)
    return folder


def write_tiny_detector(folder: Path) -> Path:
    """A random RT-DETR (ResNet backbone) with a "person" class, its image processor at 64 x 64."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig

    torch.manual_seed(5)
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                  layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    cfg = RTDetrConfig(backbone_config=backbone, d_model=16, encoder_hidden_dim=16, encoder_in_channels=[16, 16, 32],
                       encoder_ffn_dim=32, encoder_layers=1, decoder_layers=1, decoder_ffn_dim=32, num_queries=10,
                       decoder_attention_heads=2, encoder_attention_heads=2, decoder_n_points=2,
                       num_feature_levels=3, feat_strides=[8, 16, 32], decoder_in_channels=[16, 16, 16],
                       anchor_image_size=None, num_labels=2, id2label={0: "person", 1: "cat"},
                       label2id={"person": 0, "cat": 1})
    RTDetrForObjectDetection(cfg).save_pretrained(folder)
    RTDetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pose_ckpts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pose_ckpts")
    write_tiny_pose(an.Annotator(an.POSE_REPO).folder(root))
    write_tiny_detector(an.Annotator(an.PERSON_DETECTOR_REPO).folder(root))
    return root


def reference_pose(ckpts: Path, photo: Path, detector: bool) -> tuple[np.ndarray, list]:
    """(person boxes, OpenPose keypoints per person) by the tiny models evaluated directly with their processors."""
    from transformers import (
        RTDetrForObjectDetection,
        RTDetrImageProcessor,
        VitPoseForPoseEstimation,
        VitPoseImageProcessor,
    )

    picture = Image.open(photo).convert("RGB")
    boxes = np.array([[0.0, 0.0, W, H]])
    if detector:
        folder = an.Annotator(an.PERSON_DETECTOR_REPO).folder(ckpts)
        processor = RTDetrImageProcessor.from_pretrained(folder)
        with torch.no_grad():
            out = RTDetrForObjectDetection.from_pretrained(folder).eval()(**processor(images=picture,
                                                                                     return_tensors="pt"))
        found = processor.post_process_object_detection(out, target_sizes=[(H, W)], threshold=0.3)[0]
        xyxy = found["boxes"][found["labels"] == 0].numpy()
        assert len(xyxy)  # the random detector sees "people": the boxes path is the one tested
        boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    folder = an.Annotator(an.POSE_REPO).folder(ckpts)
    processor = VitPoseImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = VitPoseForPoseEstimation.from_pretrained(folder).eval()(**processor(picture, boxes=[boxes.tolist()],
                                                                                  return_tensors="pt"))
    people = processor.post_process_pose_estimation(out, boxes=[boxes.tolist()])[0]
    return boxes, [an.coco_to_openpose(p["keypoints"].numpy(), p["scores"].numpy(), threshold=0.3) for p in people]


@pytest.mark.parametrize("detector", [True, False])
def test_pose_map_is_the_skeletons_of_the_models_keypoints(tiny_dir, net, photo, pose_ckpts, tmp_path, capsys,
                                                           monkeypatch, detector):
    if not detector:  # no detector configured: the whole picture is one person's box
        monkeypatch.setattr(an, "PERSON_DETECTOR_REPO", None)
    out = tmp_path / "p.png"
    rc, _, err = run(tiny_dir, net, photo, out, "pose", capsys, "--checkpoints-dir", str(pose_ckpts))
    assert rc == 0, err
    boxes, people = reference_pose(pose_ckpts, photo, detector)
    got = saved_map(out)
    assert got.shape == (H, W, 3) and got.any()
    assert np.array_equal(got, np.asarray(an.draw_openpose(people, W, H)))
    assert len(people) == len(boxes) and any(p is not None for person in people for p in person)


def test_annotators_are_freed_once_the_map_is_made(ckpts, photo, monkeypatch):
    import weakref

    from models.z_image.control_map import control_map

    loaded, events = [], []
    real = an._load

    def spy(folder, model_class):
        processor, model = real(folder, model_class)
        loaded.append(weakref.ref(model))
        return processor, model

    monkeypatch.setattr(an, "_load", spy)
    picture = control_map(str(photo), "depth", W, H, checkpoints_dir=ckpts, on_event=events.append)
    assert picture.size == (W, H) and len(loaded) == 1 and loaded[0]() is None  # nothing kept after the job
    assert [e["step"] for e in events if e["kind"] == "preprocess"] == [0, 1, 2]
    assert not [e for e in events if e["kind"] == "download"]  # present: nothing fetched


def test_a_picture_without_people_gives_an_empty_pose_map(photo, pose_ckpts, monkeypatch):
    """The detector finds nobody: no skeleton is made up (OpenPose and DWPose draw nothing then), and the pose
    model is not even run."""
    from models.z_image.control_map import control_map

    monkeypatch.setattr(an, "PERSON_SCORE", 1.01)  # no detection passes
    loaded = []
    real = an._load
    monkeypatch.setattr(an, "_load", lambda folder, cls: loaded.append(cls) or real(folder, cls))
    picture = control_map(str(photo), "pose", W, H, checkpoints_dir=pose_ckpts)
    assert picture.size == (W, H) and not np.asarray(picture).any()
    assert loaded == ["AutoModelForObjectDetection"]
