"""Finding faces and aligning them to the FFHQ 512 template that GFPGAN and CodeFormer were trained on.

Two detectors, both giving a box and five landmarks (eyes, nose tip, mouth corners) per face:

- **RetinaFace** (ResNet-50, through `facexlib`), the detector A1111 uses. Its weights
  (`detection_Resnet50_Final.pth`, 104 MB) are looked for in `models/facexlib` (and `models/GFPGAN`,
  `models/Codeformer`, where older installs keep them) and downloaded into `models/facexlib` on first
  use when the machine is online.
- **OpenCV Haar cascades** (`haarcascade_frontalface_default.xml` and `haarcascade_eye.xml`, shipped by
  `opencv-python-headless` 4.x): the offline fallback, needing no download. Upright frontal faces only;
  the landmarks come from the detected eyes (or, without them, the box), placed by the template's geometry.

The setting `face_detector` chooses: "Automatic" (RetinaFace when its weights are present or can be
downloaded, else Haar), "RetinaFace" or "OpenCV Haar cascade". The log says which one is in use and why.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.core.errors import UserError

log = logging.getLogger("easel.postprocess")

# The five landmarks of the FFHQ alignment at 512x512 (left eye, right eye, nose, left and right mouth corner,
# "left"/"right" as seen in the image), as used by facexlib's FaceRestoreHelper for GFPGAN and CodeFormer.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
FACE_SIZE = 512
BORDER_VALUE = (132, 133, 135)  # the grey facexlib pads aligned crops with (RGB)

RETINAFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"
RETINAFACE_FILE = "detection_Resnet50_Final.pth"
DETECTOR_CHOICES = ("Automatic", "RetinaFace", "OpenCV Haar cascade")
OFFLINE_RETRY_S = 600.0


@dataclass
class DetectedFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    score: float
    landmarks: np.ndarray  # (5, 2) float32, in image pixels, ordered as FFHQ_TEMPLATE_512

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))


def landmarks_from_eyes(left_eye, right_eye) -> np.ndarray:
    """All five landmarks from the two eye centres, by the similarity that maps the template's eyes onto them."""
    src = FFHQ_TEMPLATE_512[:2].astype(np.float64)
    dst = np.array([left_eye, right_eye], dtype=np.float64)
    s_vec, d_vec = src[1] - src[0], dst[1] - dst[0]
    # complex-number similarity: z -> a*z + b
    a = complex(*d_vec) / complex(*s_vec)
    b = complex(*dst[0]) - a * complex(*src[0])
    pts = [a * complex(x, y) + b for x, y in FFHQ_TEMPLATE_512]
    return np.array([[p.real, p.imag] for p in pts], dtype=np.float32)


class HaarCascadeDetector:
    """OpenCV's Viola-Jones cascades: frontal faces, then the eyes inside each face for the landmarks."""

    name = "OpenCV Haar cascade"

    def __init__(self):
        import cv2

        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise RuntimeError("this OpenCV build has no Haar cascades (opencv-python-headless 5.x dropped them; "
                               "4.x ships them)")
        folder = Path(cv2.data.haarcascades)
        self.faces = cv2.CascadeClassifier(str(folder / "haarcascade_frontalface_default.xml"))
        self.eyes = cv2.CascadeClassifier(str(folder / "haarcascade_eye.xml"))
        if self.faces.empty() or self.eyes.empty():
            raise RuntimeError(f"the Haar cascade files in {folder} could not be read")

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        import cv2

        h, w = rgb.shape[:2]
        scale = min(1.0, 1280 / max(h, w))  # cascades gain nothing from very large images
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1:
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        min_side = max(24, int(min(gray.shape) * 0.04))
        boxes, _levels, weights = self.faces.detectMultiScale3(gray, scaleFactor=1.1, minNeighbors=5,
                                                                minSize=(min_side, min_side), outputRejectLevels=True)
        found = []
        for (x, y, bw, bh), weight in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            eyes = self._eyes(gray, x, y, bw, bh)
            if eyes is None:  # the typical eye positions in a Haar face box
                eyes = ((x + 0.30 * bw, y + 0.38 * bh), (x + 0.70 * bw, y + 0.38 * bh))
            marks = landmarks_from_eyes(*eyes) / scale
            box = (x / scale, y / scale, (x + bw) / scale, (y + bh) / scale)
            found.append(DetectedFace(box=box, score=float(weight), landmarks=marks))
        return sorted(found, key=lambda f: -f.score)

    def _eyes(self, gray: np.ndarray, x: int, y: int, bw: int, bh: int):
        """The two eye centres inside a face box, or None when they are not found plausibly."""
        top = gray[y:y + int(bh * 0.6), x:x + bw]
        size = max(8, bw // 8)
        eyes = self.eyes.detectMultiScale(top, scaleFactor=1.1, minNeighbors=3, minSize=(size, size))
        eyes = np.asarray(eyes).reshape(-1, 4)
        lefts = [e for e in eyes if e[0] + e[2] / 2 < bw * 0.5]
        rights = [e for e in eyes if e[0] + e[2] / 2 >= bw * 0.5]
        if not lefts or not rights:
            return None
        best = None
        for le in lefts:
            for re_ in rights:
                lc = (le[0] + le[2] / 2, le[1] + le[3] / 2)
                rc = (re_[0] + re_[2] / 2, re_[1] + re_[3] / 2)
                dist = rc[0] - lc[0]
                # plausible: 25-65 % of the face width apart, nearly level, similar sizes
                if not 0.25 * bw <= dist <= 0.65 * bw or abs(rc[1] - lc[1]) > 0.25 * dist:
                    continue
                cost = abs(le[2] - re_[2]) / max(le[2], re_[2]) + abs(rc[1] - lc[1]) / dist
                if best is None or cost < best[0]:
                    best = (cost, lc, rc)
        if best is None:
            return None
        (lx, ly), (rx, ry) = best[1], best[2]
        return (x + lx, y + ly), (x + rx, y + ry)


class RetinaFaceDetector:
    """facexlib's RetinaFace (ResNet-50), loaded from its weights file with `torch.load(weights_only=True)`."""

    name = "RetinaFace (ResNet-50)"

    def __init__(self, weights: Path, device):
        import torch
        from facexlib.detection.retinaface import RetinaFace

        self.device = torch.device(device)
        net = RetinaFace(network_name="resnet50", half=False, device=self.device)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            state = {k.removeprefix("module."): v for k, v in state.items()}
            net.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001  damaged or foreign file
            raise UserError(f"Could not load the RetinaFace weights {weights}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}. Delete the file to download it again.") from exc
        self.net = net.to(self.device).eval()
        self.weights = weights

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        import cv2
        import torch

        h, w = rgb.shape[:2]
        # as A1111 (resize=640): small images are enlarged so the short side is 640; very large ones are capped
        scale = max(1.0, 640 / min(h, w))
        scale = min(scale, 2560 / max(h, w))
        img = rgb if scale == 1 else cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
        bgr = np.ascontiguousarray(img[..., ::-1])
        with torch.inference_mode():
            dets = self.net.detect_faces(bgr, conf_threshold=0.97)
        found = []
        for det in np.asarray(dets).reshape(-1, 15):
            box = tuple(float(v) / scale for v in det[:4])
            marks = (det[5:15].reshape(5, 2) / scale).astype(np.float32)
            face = DetectedFace(box=box, score=float(det[4]), landmarks=marks)
            if face.eye_distance >= 5:
                found.append(face)
        return found


class FaceDetectors:
    """Picks and caches the face detector for the backend process (see the module docstring)."""

    def __init__(self, models_dir: Path, extra_dirs: list[Path] | None = None):
        self.download_dir = Path(models_dir) / "facexlib"
        self.search_dirs = [self.download_dir] + list(extra_dirs or [])
        self._retina: dict[str, RetinaFaceDetector] = {}
        self._haar: HaarCascadeDetector | None = None
        self._offline_since: float | None = None
        self._announced: str | None = None

    def weights_file(self) -> Path | None:
        for folder in self.search_dirs:
            candidate = folder / RETINAFACE_FILE
            if candidate.is_file():
                return candidate
        return None

    def _download(self, required: bool) -> Path | None:
        from backend.downloads import download_file, network_available

        if self._offline_since is not None and time.time() - self._offline_since < OFFLINE_RETRY_S and not required:
            return None
        if not network_available(RETINAFACE_URL):
            self._offline_since = time.time()
            if required:
                raise UserError(f"The RetinaFace face detector needs {RETINAFACE_FILE}, which is not in "
                                f"{self.download_dir} and cannot be downloaded (no internet connection). Download "
                                f"{RETINAFACE_URL} into that folder, or choose the 'OpenCV Haar cascade' face detector "
                                f"in Settings.", status=404)
            return None
        log.info("downloading the RetinaFace face detector weights into %s", self.download_dir)
        return download_file(RETINAFACE_URL, self.download_dir / RETINAFACE_FILE)

    def get(self, mode: str = "Automatic", device="cpu"):
        """The detector for `mode` (one of DETECTOR_CHOICES)."""
        if mode not in DETECTOR_CHOICES:
            raise UserError(f"Unknown face detector {mode!r}. Choose one of: {', '.join(DETECTOR_CHOICES)}.")
        if mode == "OpenCV Haar cascade":
            return self._haar_detector("chosen in Settings")
        weights = self.weights_file()
        reason = ""
        if weights is None:
            weights = self._download(required=mode == "RetinaFace")
            if weights is None:
                reason = (f"offline fallback: RetinaFace weights ({RETINAFACE_FILE}) are not in {self.download_dir} "
                          f"and there is no internet connection to download them")
        if weights is not None:
            try:
                return self._retina_detector(weights, device)
            except ImportError as exc:
                if mode == "RetinaFace":
                    raise UserError(f"The RetinaFace detector needs the facexlib package, which cannot be imported "
                                    f"({exc}). Install it (see README) or choose 'OpenCV Haar cascade'.") from exc
                reason = f"offline fallback: facexlib cannot be imported ({exc})"
        return self._haar_detector(reason)

    def _retina_detector(self, weights: Path, device) -> RetinaFaceDetector:
        key = f"{weights}|{device}"
        if key not in self._retina:
            self._retina = {key: RetinaFaceDetector(weights, device)}
        detector = self._retina[key]
        self._announce(f"{detector.name} from {weights} on {device}")
        return detector

    def _haar_detector(self, reason: str) -> HaarCascadeDetector:
        if self._haar is None:
            try:
                self._haar = HaarCascadeDetector()
            except RuntimeError as exc:
                raise UserError(f"No face detector is available: {exc}. Put {RETINAFACE_FILE} in "
                                f"{self.download_dir} to use RetinaFace.") from exc
        self._announce(f"{HaarCascadeDetector.name} ({reason})" if reason else HaarCascadeDetector.name)
        return self._haar

    def _announce(self, what: str) -> None:
        if what != self._announced:
            self._announced = what
            log.info("face detection: %s", what)


def alignment_matrix(landmarks: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The 2x3 similarity that maps a face's five landmarks onto the FFHQ template at `size` (least median squares)."""
    import cv2

    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)
    if matrix is None:  # degenerate landmarks: fall back to the two eyes
        s = landmarks_from_eyes(landmarks[0], landmarks[1])
        matrix, _ = cv2.estimateAffinePartial2D(s, template, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("cannot align a face with degenerate landmarks")
    return matrix


def align_face(rgb: np.ndarray, face: DetectedFace, size: int = FACE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """-> (the face warped onto the template, size x size x 3 uint8; the 2x3 matrix used)."""
    import cv2

    matrix = alignment_matrix(face.landmarks, size)
    crop = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_VALUE)
    return crop, matrix
