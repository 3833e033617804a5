"""Annotators: the small vision models that turn a picture into a ControlNet control map (depth, pose).

Their weights are ordinary Hub repositories fetched on first use by the app's downloader (models/downloads.py:
progress bar, resume, the offline message of the model files) into `<checkpoints>/annotators/<repo name>/`, and
run through transformers on the CPU: they are small (Depth Anything V2 Small 25 M parameters, ViTPose-B 90 M,
RT-DETR R50 43 M), so they never compete with the image model for GPU memory. Each is loaded for the job and
dropped when its map is made: nothing stays in memory between jobs.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.errors import UserError

log = logging.getLogger(__name__)

ANNOTATORS_SUBDIR = "annotators"  # under the checkpoints folder
# what a transformers model folder needs; the Hub repositories below hold exactly these (plus a README)
REPO_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")

DEPTH_REPO = "depth-anything/Depth-Anything-V2-Small-hf"  # about 99 MB
POSE_REPO = "usyd-community/vitpose-base-simple"  # about 344 MB
# person boxes for the top-down pose model (about 172 MB); None: the whole picture is one person's box
PERSON_DETECTOR_REPO: str | None = "PekingU/rtdetr_r50vd_coco_o365"
PERSON_SCORE = 0.3  # detector confidence for a person box
KEYPOINT_SCORE = 0.3  # keypoints below this are left out of the skeleton (OpenPose's drawing threshold too)

Progress = Callable[[int, int, str], None]  # (step, total, what)


@dataclass(frozen=True)
class Annotator:
    repo_id: str

    def folder(self, checkpoints_dir: Path) -> Path:
        return Path(checkpoints_dir) / ANNOTATORS_SUBDIR / self.repo_id.split("/")[-1]

    def specs(self, checkpoints_dir: Path) -> list:
        from models.downloads import FileSpec

        return [FileSpec(self.repo_id, name, self.folder(checkpoints_dir) / name) for name in REPO_FILES]


def annotators_for(control_type: str) -> list[Annotator]:
    """The annotators a control type needs (none for the OpenCV ones)."""
    if control_type == "depth":
        return [Annotator(DEPTH_REPO)]
    if control_type == "pose":
        return [Annotator(POSE_REPO)] + ([Annotator(PERSON_DETECTOR_REPO)] if PERSON_DETECTOR_REPO else [])
    return []


def fetch(annotators: Sequence[Annotator], checkpoints_dir: Path, on_download: Callable[[list[str]], None] | None = None
          ) -> list[Path]:
    """Each annotator's folder, its missing files downloaded first (UserError offline or on a failed download)."""
    from models.downloads import download_files, missing_files

    specs = [s for a in annotators for s in a.specs(checkpoints_dir)]
    missing = missing_files(specs)
    if missing and on_download is not None:
        on_download([f"{s.repo_id}/{s.repo_path}" for s in missing])
    download_files(specs)
    return [a.folder(checkpoints_dir) for a in annotators]


def _quiet_transformers() -> None:
    # without torchvision transformers picks its PIL image processors and says so on every load, and shows a bar
    # for loading a few hundred tensors: not the user's concern (our own bar says what runs)
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _load(folder: Path, model_class: str):
    """(image processor, model in eval mode on the CPU) of a downloaded annotator folder."""
    import transformers

    _quiet_transformers()
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        model = getattr(transformers, model_class).from_pretrained(folder).eval()
    except (OSError, ValueError, KeyError) as e:  # a damaged or foreign folder: say which, not a traceback
        raise UserError(f"cannot load the annotator in {folder} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "delete the folder to download it again") from None
    return processor, model


def _release() -> None:
    gc.collect()


# ---------------------------------------------------------------- depth


def normalise_depth(depth: np.ndarray) -> np.ndarray:
    """Depth Anything's relative depth (a disparity: larger = nearer) as 0-255 grey, min -> 0, max -> 255, so
    near is bright as in ControlNet depth maps (a flat prediction is black)."""
    d = depth.astype(np.float64)
    span = d.max() - d.min()
    if span <= 0:
        return np.zeros(d.shape, np.uint8)
    return np.round((d - d.min()) / span * 255.0).astype(np.uint8)


def depth_map(picture: Image.Image, folder: Path, progress: Progress | None = None) -> Image.Image:
    """The depth map of picture (RGB, picture's size) by the Depth Anything model in folder."""
    import torch

    step = progress or (lambda i, n, what: None)
    step(0, 2, "loading the depth model")
    processor, model = _load(folder, "AutoModelForDepthEstimation")
    try:
        step(1, 2, "estimating depth")
        with torch.inference_mode():
            inputs = processor(images=picture.convert("RGB"), return_tensors="pt")
            outputs = model(**inputs)
            # the processor's own resize back to the picture's size (bicubic on the predicted map)
            depth = processor.post_process_depth_estimation(
                outputs, target_sizes=[(picture.height, picture.width)])[0]["predicted_depth"]
        grey = normalise_depth(depth.float().numpy())
    finally:
        del processor, model
        _release()
    step(2, 2, "depth map done")
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")


# ---------------------------------------------------------------- pose

# OpenPose's 18 body keypoints (the order ControlNet's pose maps are drawn in), each as COCO's index; the neck
# (1) is not a COCO keypoint: the middle of the shoulders
COCO_FOR_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
NECK_FROM = (5, 6)  # COCO left and right shoulder
# OpenPose's 17 drawn limbs (pairs of the 18 keypoints above) and its 18 colours (RGB), limb i and keypoint i
# taking colour i: the look the pose ControlNets were trained on
OPENPOSE_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
                  (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
OPENPOSE_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                   (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                   (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
LIMB_SHADE = 0.6  # OpenPose draws limbs at 60 % of their colour, keypoints at full colour on top


def coco_to_openpose(keypoints: np.ndarray, scores: np.ndarray, threshold: float = KEYPOINT_SCORE
                     ) -> list[tuple[float, float] | None]:
    """One person's 17 COCO keypoints (x, y) and scores -> the 18 OpenPose keypoints, None where not seen."""
    seen = [tuple(map(float, keypoints[i])) if scores[i] >= threshold else None for i in range(len(scores))]
    out: list[tuple[float, float] | None] = []
    for coco in COCO_FOR_OPENPOSE:
        if coco is None:
            a, b = (seen[i] for i in NECK_FROM)
            out.append(((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) if a and b else None)
        else:
            out.append(seen[coco])
    return out


def draw_openpose(people: Sequence[Sequence[tuple[float, float] | None]], width: int, height: int) -> Image.Image:
    """OpenPose-style skeletons (18 keypoints each, None = not seen) on black: limbs as filled ellipses at 60 %
    of their colour, keypoints as full-colour discs; line width and disc size as OpenPose's at 512 px (4 px),
    scaled with the picture."""
    import cv2

    canvas = np.zeros((height, width, 3), np.uint8)
    size = max(1, round(4 * min(width, height) / 512))
    for person in people:
        for i, (a, b) in enumerate(OPENPOSE_LIMBS):
            pa, pb = person[a], person[b]
            if pa is None or pb is None:
                continue
            (xa, ya), (xb, yb) = pa, pb
            length = float(np.hypot(xb - xa, yb - ya))
            angle = float(np.degrees(np.arctan2(yb - ya, xb - xa)))
            polygon = cv2.ellipse2Poly((round((xa + xb) / 2), round((ya + yb) / 2)), (round(length / 2), size),
                                       round(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(c * LIMB_SHADE) for c in OPENPOSE_COLORS[i]])
        for i, point in enumerate(person):
            if point is not None:
                cv2.circle(canvas, (round(point[0]), round(point[1])), size, OPENPOSE_COLORS[i], thickness=-1)
    return Image.fromarray(canvas, mode="RGB")


def _person_boxes(picture: Image.Image, folder: Path | None) -> np.ndarray:
    """Person boxes (x, y, w, h: COCO's, as ViTPose takes them) by the detector in folder; the whole picture
    when there is no detector (a single person filling the frame is the common case); none when the detector
    finds nobody (ViTPose would still place 17 points in a landscape: OpenPose and DWPose draw nothing)."""
    import torch

    whole = np.array([[0.0, 0.0, picture.width, picture.height]])
    if folder is None:
        return whole
    processor, model = _load(folder, "AutoModelForObjectDetection")
    try:
        with torch.inference_mode():
            outputs = model(**processor(images=picture, return_tensors="pt"))
            found = processor.post_process_object_detection(
                outputs, target_sizes=[(picture.height, picture.width)], threshold=PERSON_SCORE)[0]
        person = {v.lower(): int(k) for k, v in model.config.id2label.items()}.get("person", 0)
        boxes = found["boxes"][found["labels"] == person].float().numpy()
    finally:
        del processor, model
        _release()
    if not len(boxes):
        log.warning("pose: the detector found no person in the control image: the pose map is empty")
        return boxes.reshape(0, 4)
    boxes[:, 2:] -= boxes[:, :2]  # corners -> width, height
    return boxes


def pose_map(picture: Image.Image, folder: Path, detector: Path | None = None, progress: Progress | None = None
             ) -> Image.Image:
    """The OpenPose-style skeleton map (picture's size) of the people in picture: person boxes by the detector in
    `detector` (None: the whole picture), their COCO keypoints by the ViTPose model in folder."""
    import torch

    step = progress or (lambda i, n, what: None)
    picture = picture.convert("RGB")
    step(0, 3, "finding people")
    boxes = _person_boxes(picture, detector)
    if not len(boxes):
        step(3, 3, "pose map done: nobody found")
        return draw_openpose([], picture.width, picture.height)
    step(1, 3, f"estimating the pose of {len(boxes)} {'person' if len(boxes) == 1 else 'people'}")
    processor, model = _load(folder, "VitPoseForPoseEstimation")
    try:
        with torch.inference_mode():
            inputs = processor(picture, boxes=[boxes.tolist()], return_tensors="pt")
            outputs = model(**inputs)
            found = processor.post_process_pose_estimation(outputs, boxes=[boxes.tolist()])[0]
    finally:
        del processor, model
        _release()
    step(2, 3, "drawing the skeletons")
    people = [coco_to_openpose(p["keypoints"].float().numpy(), p["scores"].float().numpy()) for p in found]
    out = draw_openpose(people, picture.width, picture.height)
    step(3, 3, "pose map done")
    return out


__all__ = ["ANNOTATORS_SUBDIR", "Annotator", "COCO_FOR_OPENPOSE", "DEPTH_REPO", "OPENPOSE_COLORS", "OPENPOSE_LIMBS",
           "PERSON_DETECTOR_REPO", "POSE_REPO", "REPO_FILES", "annotators_for", "coco_to_openpose", "depth_map",
           "draw_openpose", "fetch", "normalise_depth", "pose_map"]
