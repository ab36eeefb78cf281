"""Automatic cleaning of a training collection and box estimation (Gordo et al. 2016, "Deep Image Retrieval:
Learning global representations for image search", ECCV, Sec. 4.1).

Inside every group (images labelled as the same object / place):

1. *Matching* (Sec. 4.1, "Cleaning"): SIFT keypoints (OpenCV) of each image, capped at ``max_side`` pixels;
   every pair is matched with the first-to-second-neighbour ratio test (Lowe 2004) and verified with an
   affine model fitted by RANSAC (``cv2.estimateAffine2D``).  The pair's score is its number of inliers.
2. *Graph*: one node per image, an edge per verified pair whose score reaches ``min_inliers``; only the
   largest connected component of each group is kept (the rest is noise: other objects, failed photos).
3. *Boxes* (Sec. 4.1, "Bounding box estimation"): the initial box of an image is the geometric median of
   the rectangles around its inliers, one rectangle per verified pair; then the boxes are diffused over the
   graph, ``B_j <- (1 - alpha) B_j + alpha A_ij B_i`` (alpha = 0.1), where ``A_ij B_i`` is box ``B_i``
   projected into image ``j`` through the pair's affine transform and the predictions of all neighbours
   ``i`` of ``j`` are merged with the geometric median, until the boxes stop moving.

All boxes are ``[x0, y0, x1, y1]`` in pixels of the ORIGINAL image (SIFT runs on a shrunk copy; keypoints
and affine transforms are mapped back).  :func:`clean_and_box` runs everything over a
:class:`~instance_search.eval.datasets.splits.TrainingSet`; :func:`save_boxes` / :func:`load_boxes` write and
read (with validation) the boxes file used to train the region proposal network.

``device`` (``isearch clean --device``): SIFT and RANSAC run on the CPU (OpenCV); the descriptor distances of
the ratio test -- one (Na, Nb) matrix product per pair -- run on ``"cuda"`` when asked, on the CPU (NumPy)
otherwise.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import FileFormatError
from ..io import load_npz

__all__ = [
    "SiftFeatures", "PairMatch", "Edge", "GroupResult", "CleaningParams", "CleaningResult", "BoxesFileError",
    "sift_features", "ratio_matches", "match_pair", "SiftCache", "matching_graph", "largest_component",
    "box_from_points", "geometric_median", "geometric_median_batch", "project_box", "initial_boxes",
    "diffuse_boxes", "clean_group", "clean_and_box", "groups_from_folder", "save_boxes", "load_boxes", "BOXES_FORMAT",
]

BOXES_FORMAT = "instance-search/train-boxes"
BOXES_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# SIFT features
# ----------------------------------------------------------------------------------------------------------

def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("cleaning needs OpenCV: pip install opencv-python-headless") from exc
    threads = os.environ.get("ISEARCH_THREADS")
    if threads and threads.isdigit():
        cv2.setNumThreads(int(threads))
    return cv2


@dataclass
class SiftFeatures:
    """SIFT keypoints of one image.

    ``keypoints`` (N, 2) float32 are (x, y) in the pixels of the shrunk working copy (longer side
    <= ``max_side``); ``descriptors`` (N, 128) float32; ``scale`` = (sx, sy) maps working to original pixels;
    ``size`` = original (width, height).
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scale: tuple[float, float]
    size: tuple[int, int]
    path: str = ""

    def __len__(self) -> int:
        return len(self.keypoints)

    def to_original(self, pts: np.ndarray) -> np.ndarray:
        """Working-copy (x, y) -> original-image (x, y)."""
        return np.asarray(pts, dtype=np.float64) * np.asarray(self.scale, dtype=np.float64)

    @property
    def keypoints_original(self) -> np.ndarray:
        return self.to_original(self.keypoints)


def sift_features(image, max_side: int = 512, max_keypoints: int = 2000) -> SiftFeatures:
    """SIFT (Lowe 2004; OpenCV ``cv2.SIFT_create``) on ``image`` (a path or a PIL image) shrunk to
    ``max_side`` pixels on its longer side; at most ``max_keypoints`` (the strongest) are kept.

    A PIL image is taken as the original (its own size); a path is loaded with
    :func:`~instance_search.images.load_image` (EXIF-rotated; errors name the file).
    """
    from PIL import Image

    from ..images import load_image, resize_max

    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    path = ""
    if isinstance(image, Image.Image):
        original = image.size
        img = resize_max(image.convert("RGB"), max_side)
    else:
        path = str(image)
        img = load_image(image, max_size=max_side)
        original = tuple(img.info.get("original_size", img.size))
    cv2 = _cv2()
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    sift = cv2.SIFT_create(nfeatures=int(max_keypoints))
    kps, desc = sift.detectAndCompute(gray, None)
    if desc is None or not kps:
        pts = np.zeros((0, 2), np.float32)
        desc = np.zeros((0, 128), np.float32)
    else:
        pts = np.array([kp.pt for kp in kps], dtype=np.float32)
        desc = np.asarray(desc, dtype=np.float32)
        if max_keypoints and len(pts) > max_keypoints:  # OpenCV may keep ties beyond nfeatures
            order = np.argsort([-kp.response for kp in kps], kind="stable")[:max_keypoints]
            pts, desc = pts[order], desc[order]
    scale = (original[0] / img.width, original[1] / img.height)
    return SiftFeatures(pts, desc, (float(scale[0]), float(scale[1])), (int(original[0]), int(original[1])), path)


class SiftCache:
    """SIFT features per image, kept in memory and (with ``folder``) in ``.npz`` files keyed by the file's
    resolved path, size, mtime and the SIFT parameters, so a re-run skips the extraction."""

    def __init__(self, folder: str | os.PathLike | None = None, max_side: int = 512, max_keypoints: int = 2000):
        self.folder = None if folder is None else Path(folder)
        self.max_side, self.max_keypoints = int(max_side), int(max_keypoints)
        self._mem: dict[str, SiftFeatures] = {}
        self.hits = self.computed = 0

    def _key(self, path: Path) -> str:
        st = path.stat()
        raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.max_side}|{self.max_keypoints}|v1"
        return hashlib.sha1(raw.encode()).hexdigest()[:20]

    def get(self, path: str | os.PathLike) -> SiftFeatures:
        path = Path(path)
        k = str(path.resolve())
        if k in self._mem:
            self.hits += 1
            return self._mem[k]
        f = None
        if self.folder is not None and path.is_file():
            f = self.folder / f"sift-{self._key(path)}.npz"
            if f.is_file():
                try:
                    z = load_npz(f, what="SIFT cache file")
                    feats = SiftFeatures(z["keypoints"], z["descriptors"], tuple(float(v) for v in z["scale"]),
                                         tuple(int(v) for v in z["size"]), str(path))
                    self._mem[k] = feats
                    self.hits += 1
                    return feats
                except (FileFormatError, KeyError, ValueError):
                    pass  # a broken cache file is recomputed and overwritten
        feats = sift_features(path, self.max_side, self.max_keypoints)
        self.computed += 1
        self._mem[k] = feats
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, keypoints=feats.keypoints, descriptors=feats.descriptors,
                     scale=np.asarray(feats.scale), size=np.asarray(feats.size))
            os.replace(tmp, f)
        return feats


# ----------------------------------------------------------------------------------------------------------
# Pairwise matching
# ----------------------------------------------------------------------------------------------------------

@dataclass
class PairMatch:
    """Result of :func:`match_pair` for images a and b.

    ``n_tentative``: matches that pass the ratio test; ``inliers_a`` / ``inliers_b`` (K, 2): the RANSAC
    inliers in ORIGINAL pixels of a and b; ``affine`` (2, 3) maps original pixels of a to those of b
    (``None`` when no plausible model was found); ``score`` = K (0 without a model).
    """

    n_tentative: int
    inliers_a: np.ndarray
    inliers_b: np.ndarray
    affine: np.ndarray | None
    score: int
    reason: str = ""


def _empty_match(n: int, reason: str) -> PairMatch:
    z = np.zeros((0, 2))
    return PairMatch(n, z, z, None, 0, reason)


def _plausible_affine(A: np.ndarray, max_scale: float, max_anisotropy: float) -> str:
    """'' if the linear part of ``A`` is a plausible viewpoint change, else why not (mirror, collapse, ...)."""
    L = A[:, :2]
    if not np.all(np.isfinite(A)):
        return "non-finite affine"
    if np.linalg.det(L) <= 0:
        return "mirrored or singular affine"
    s = np.linalg.svd(L, compute_uv=False)
    if s[1] <= 0 or s[0] > max_scale or s[1] < 1.0 / max_scale:
        return f"implausible scale change ({s[0]:.3g}, {s[1]:.3g})"
    if s[0] / s[1] > max_anisotropy:
        return f"implausible anisotropy {s[0] / s[1]:.3g}"
    return ""


def _two_nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two nearest rows of ``b`` (Nb >= 2) for each row of ``a`` and their squared L2 distances (in no
    particular order): ``(indices (Na, 2) int64, squared distances (Na, 2) float32)``; NumPy, float32."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    np.maximum(d2, 0.0, out=d2)
    two = np.argpartition(d2, 1, axis=1)[:, :2]
    return two.astype(np.int64), np.take_along_axis(d2, two, axis=1)


def _two_nearest_torch(a: np.ndarray, b: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_two_nearest` with torch on ``device`` (e.g. ``"cuda"``): the same float32 formula, the distance
    matrix never leaves the device; only the (Na, 2) results come back."""
    import torch

    dev = torch.device(device)
    ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
    d2 = (ta * ta).sum(1)[:, None] + (tb * tb).sum(1)[None, :] - 2.0 * (ta @ tb.T)
    d2.clamp_(min=0.0)
    v, two = torch.topk(d2, 2, dim=1, largest=False)
    return two.cpu().numpy().astype(np.int64), v.cpu().numpy()


def ratio_matches(da: np.ndarray, db: np.ndarray, ratio: float = 0.8,
                  device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tentative matches a -> b with Lowe's first-to-second-neighbour ratio test (Lowe 2004, Sec. 7.1):
    row q of ``da`` (Na, D) matches its nearest row t of ``db`` (Nb, D, Nb >= 2) when
    ``|a_q - b_t| < ratio * |a_q - b_t2|`` (t2: second nearest); each t keeps only its closest q.
    Returns (query indices into a, target indices into b), sorted by target.  Exhaustive L2 search in
    float32 through one matrix product (same result as OpenCV's brute-force matcher, faster here); with
    ``device`` other than None / ``"cpu"`` (e.g. ``"cuda"``) that product runs there with torch."""
    a = np.ascontiguousarray(da, dtype=np.float32)
    b = np.ascontiguousarray(db, dtype=np.float32)
    if len(a) == 0 or len(b) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if device is None or str(device) == "cpu":
        two, v = _two_nearest(a, b)
    else:
        two, v = _two_nearest_torch(a, b, device)
    first = np.argmin(v, axis=1)
    nn = two[np.arange(len(a)), first]
    d1, d2nd = v[np.arange(len(a)), first], v[np.arange(len(a)), 1 - first]
    ok = np.flatnonzero(d1 < (ratio * ratio) * d2nd)
    if ok.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q, t, dist = ok, nn[ok], d1[ok]
    order = np.lexsort((dist, t))  # by target, closest first
    q, t = q[order], t[order]
    first_of_t = np.ones(len(t), bool)
    first_of_t[1:] = t[1:] != t[:-1]
    return q[first_of_t].astype(np.int64), t[first_of_t].astype(np.int64)


def match_pair(fa: SiftFeatures, fb: SiftFeatures, ratio: float = 0.8, ransac_px: float = 6.0,
               max_scale: float = 8.0, max_anisotropy: float = 4.0, seed: int = 0,
               device: str | None = None) -> PairMatch:
    """Match SIFT features of a to b and verify them with an affine model (Gordo et al. 2016, Sec. 4.1).

    Tentative matches: nearest neighbour in b of each descriptor of a whose distance is below ``ratio``
    times the second nearest (Lowe 2004, Sec. 7.1), one match per keypoint of b (the closest).  An affine
    transform is fitted with RANSAC (``cv2.estimateAffine2D``, reprojection threshold ``ransac_px`` in
    working-copy pixels of b); mirrored, collapsed or wildly scaled models are refused.  The score is the
    number of inliers.  ``device``: where the ratio test's distances are computed (:func:`ratio_matches`).
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if len(fa) < 2 or len(fb) < 2:
        return _empty_match(0, "too few keypoints")
    qa, tb = ratio_matches(fa.descriptors, fb.descriptors, ratio, device=device)
    n = len(qa)
    if n < 3:
        return _empty_match(n, "fewer than 3 tentative matches")
    pa, pb = fa.keypoints[qa].astype(np.float64), fb.keypoints[tb].astype(np.float64)
    cv2 = _cv2()
    cv2.setRNGSeed(int(seed))
    A_work, mask = cv2.estimateAffine2D(pa, pb, method=cv2.RANSAC, ransacReprojThreshold=float(ransac_px),
                                        maxIters=2000, confidence=0.995, refineIters=10)
    if A_work is None or mask is None:
        return _empty_match(n, "RANSAC found no model")
    inl = mask.ravel().astype(bool)
    # Working -> original pixels: A = S_b A_work S_a^-1 (S = diag(sx, sy)).
    sa, sb = np.asarray(fa.scale), np.asarray(fb.scale)
    A = np.empty((2, 3))
    A[:, :2] = (sb[:, None] * A_work[:, :2]) / sa[None, :]
    A[:, 2] = sb * A_work[:, 2]
    why = _plausible_affine(A, max_scale, max_anisotropy)
    if why:
        return _empty_match(n, why)
    return PairMatch(n, fa.to_original(pa[inl]), fb.to_original(pb[inl]), A, int(inl.sum()))


# ----------------------------------------------------------------------------------------------------------
# Graph and components
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Edge:
    """A verified pair (i, j) of a group: ``affine`` maps original pixels of i to j; ``box_i`` / ``box_j`` are
    the rectangles around the inliers in each image."""

    i: int
    j: int
    score: int
    affine: np.ndarray
    box_i: np.ndarray
    box_j: np.ndarray

    @property
    def inverse(self) -> np.ndarray:
        """The affine transform from j to i."""
        L, t = self.affine[:, :2], self.affine[:, 2]
        Li = np.linalg.inv(L)
        return np.hstack([Li, (-Li @ t)[:, None]])


def matching_graph(features: Sequence[SiftFeatures], min_inliers: int = 10,
                   pairs: Iterable[tuple[int, int]] | None = None,
                   on_pair: Callable[[int, int, PairMatch], None] | None = None, **match_kw) -> list[Edge]:
    """Match every pair of ``features`` (or the given ``pairs``) and return an :class:`Edge` for each pair
    verified with at least ``min_inliers`` inliers (Gordo et al. 2016, Sec. 4.1).  ``on_pair`` sees every
    pair's :class:`PairMatch` (for statistics and progress)."""
    n = len(features)
    if pairs is None:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    edges = []
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"matching_graph: bad pair ({i}, {j}) for {n} images")
        m = match_pair(features[i], features[j], **match_kw)
        if on_pair is not None:
            on_pair(i, j, m)
        if m.affine is not None and m.score >= min_inliers:
            edges.append(Edge(i, j, m.score, m.affine, box_from_points(m.inliers_a), box_from_points(m.inliers_b)))
    return edges


def largest_component(n: int, edges: Sequence[Edge] | Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Nodes of the largest connected component of an undirected graph on ``n`` nodes, and the size of every
    node's component.  Ties go to the component with the larger total edge score, then the lowest node.
    Returns (sorted node indices of the largest component, (n,) component sizes)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ij = np.array([(e.i, e.j) if isinstance(e, Edge) else (int(e[0]), int(e[1])) for e in edges],
                  dtype=np.int64).reshape(-1, 2)
    w = np.array([e.score if isinstance(e, Edge) else 1 for e in edges], dtype=np.float64)
    if ij.size and (ij.min() < 0 or ij.max() >= n):
        raise ValueError(f"largest_component: edge endpoint outside 0..{n - 1}")
    g = coo_matrix((np.ones(len(ij)), (ij[:, 0], ij[:, 1])), shape=(n, n))
    k, lab = connected_components(g, directed=False)
    sizes = np.bincount(lab, minlength=k)
    score = np.zeros(k)
    if len(ij):
        np.add.at(score, lab[ij[:, 0]], w)
    first = np.array([np.flatnonzero(lab == c)[0] for c in range(k)])
    best = min(range(k), key=lambda c: (-sizes[c], -score[c], first[c]))
    return np.flatnonzero(lab == best), sizes[lab]


# ----------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------

def box_from_points(points: np.ndarray) -> np.ndarray:
    """The tightest axis-aligned rectangle ``[x0, y0, x1, y1]`` around (K, 2) points (K >= 1)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0:
        raise ValueError("box_from_points: no points")
    return np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])


def project_box(box: Sequence[float], affine: np.ndarray, mode: str = "moments") -> np.ndarray:
    """``A B``: box ``[x0, y0, x1, y1]`` mapped through the (2, 3) affine ``A`` as an axis-aligned box.

    The image of a rectangle is a parallelogram.  ``mode="corners"``: the rectangle around its four corners.
    ``mode="moments"`` (default): the box with the parallelogram's centre and the same second moments along
    x and y, i.e. width ``sqrt((w A00)^2 + (h A01)^2)``, height ``sqrt((w A10)^2 + (h A11)^2)``.  Both are
    exact for scalings and translations; under rotation "corners" grows the box (a square turned by 45
    degrees and back doubles its side), "moments" does not, so repeated diffusion does not inflate boxes.
    Broadcasts: ``box`` (..., 4) with ``affine`` (..., 2, 3).
    """
    bx = np.asarray(box, dtype=np.float64)
    A = np.asarray(affine, dtype=np.float64)
    if bx.shape[-1] != 4 or A.shape[-2:] != (2, 3):
        raise ValueError(f"project_box: need box (..., 4) and affine (..., 2, 3), got {bx.shape} and {A.shape}")
    cx, cy = (bx[..., 0] + bx[..., 2]) / 2, (bx[..., 1] + bx[..., 3]) / 2
    w, h = bx[..., 2] - bx[..., 0], bx[..., 3] - bx[..., 1]
    ncx = A[..., 0, 0] * cx + A[..., 0, 1] * cy + A[..., 0, 2]
    ncy = A[..., 1, 0] * cx + A[..., 1, 1] * cy + A[..., 1, 2]
    if mode == "corners":
        nw = np.abs(A[..., 0, 0] * w) + np.abs(A[..., 0, 1] * h)
        nh = np.abs(A[..., 1, 0] * w) + np.abs(A[..., 1, 1] * h)
    elif mode == "moments":
        nw = np.hypot(A[..., 0, 0] * w, A[..., 0, 1] * h)
        nh = np.hypot(A[..., 1, 0] * w, A[..., 1, 1] * h)
    else:
        raise ValueError(f"project_box: mode must be 'moments' or 'corners', got {mode!r}")
    return np.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2], axis=-1)


def _weiszfeld_step(x: np.ndarray, w: np.ndarray, y: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Weiszfeld step with the Vardi & Zhang (2000) correction, batched.

    x (M, K, d) points, w (M, K) weights (0 = absent), y (M, d) current estimates, eps (M,) coincidence radius.
    Returns (new y, done) where done marks estimates that sit on a data point that is the minimiser.
    """
    diff = x - y[:, None, :]
    d = np.linalg.norm(diff, axis=2)
    at = (d <= eps[:, None]) & (w > 0)
    inv = np.where(at | (w <= 0), 0.0, w / np.where(d > 0, d, 1.0))
    s = inv.sum(1)
    safe = np.where(s > 0, s, 1.0)
    T = (inv[:, :, None] * x).sum(1) / safe[:, None]
    eta = np.where(at, w, 0.0).sum(1)
    R = (inv[:, :, None] * diff).sum(1)
    r = np.linalg.norm(R, axis=1)
    on_point = eta > 0
    done = on_point & (r <= eta)
    frac = np.where(on_point, eta / np.where(r > 0, r, 1.0), 0.0)
    y_new = np.where(done[:, None] | (s[:, None] <= 0), y, (1 - frac)[:, None] * T + frac[:, None] * y)
    return y_new, done | (s <= 0)


def geometric_median(points: np.ndarray, weights: Sequence[float] | None = None, tol: float = 1e-7,
                     max_iter: int = 1000, init: np.ndarray | None = None) -> np.ndarray:
    """The point minimising the (weighted) sum of Euclidean distances to ``points`` (N, d).

    Weiszfeld's iteration ``y <- sum_i w_i x_i / |x_i - y| / sum_i w_i / |x_i - y|`` with the Vardi & Zhang
    (2000, Eq. 2.6) step when ``y`` lands on a data point, so it converges to the true minimiser even when
    that is a data point.  Starts from ``init`` (default: the weighted mean); stops when a step moves less
    than ``tol`` times the points' spread.
    """
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"geometric_median: expected (N, d) points with N >= 1, got shape {x.shape}")
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != (len(x),) or not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError("geometric_median: weights must be N finite non-negative numbers, not all zero")
    if not np.all(np.isfinite(x)):
        raise ValueError("geometric_median: points must be finite")
    return geometric_median_batch(x[None], w[None], tol=tol, max_iter=max_iter,
                                  init=None if init is None else np.asarray(init, dtype=np.float64)[None])[0]


def geometric_median_batch(points: np.ndarray, weights: np.ndarray, tol: float = 1e-7, max_iter: int = 1000,
                           init: np.ndarray | None = None) -> np.ndarray:
    """:func:`geometric_median` of M point sets at once: points (M, K, d), weights (M, K) with 0 marking
    padding (every set needs one positive weight); returns (M, d)."""
    x = np.asarray(points, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if x.ndim != 3 or w.shape != x.shape[:2]:
        raise ValueError(f"geometric_median_batch: need points (M, K, d) and weights (M, K), got {x.shape}, {w.shape}")
    if np.any(w.sum(1) <= 0):
        raise ValueError("geometric_median_batch: every point set needs a positive weight")
    wsum = w.sum(1)
    mean = (w[:, :, None] * x).sum(1) / wsum[:, None]
    y = mean.copy() if init is None else np.asarray(init, dtype=np.float64).copy()
    spread = np.where(w > 0, np.abs(x - mean[:, None, :]).max(2), 0.0).max(1)
    spread = np.where(spread > 0, spread, 1.0)
    eps = 1e-10 * spread
    active = np.ones(len(x), bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        y_new, done = _weiszfeld_step(x[idx], w[idx], y[idx], eps[idx])
        step = np.linalg.norm(y_new - y[idx], axis=1)
        y[idx] = y_new
        active[idx] = ~(done | (step <= tol * spread[idx]))
    # Weiszfeld approaches a minimiser that is a data point only sublinearly: test the data point nearest to
    # each estimate with the optimality condition |R_k| <= eta_k (Vardi & Zhang 2000, Eq. 2.4) and snap to it.
    d = np.where(w > 0, np.linalg.norm(x - y[:, None, :], axis=2), np.inf)
    k = np.argmin(d, axis=1)
    xk = x[np.arange(len(x)), k]
    diff = x - xk[:, None, :]
    dk = np.linalg.norm(diff, axis=2)
    same = (dk <= eps[:, None]) & (w > 0)
    inv = np.where(same | (w <= 0), 0.0, w / np.where(dk > 0, dk, 1.0))
    r = np.linalg.norm((inv[:, :, None] * diff).sum(1), axis=1)
    snap = r <= np.where(same, w, 0.0).sum(1)
    y[snap] = xk[snap]
    return y


def _clip(box: np.ndarray, size: tuple[int, int], min_side: float = 1.0) -> np.ndarray:
    """Clip ``box`` to a (w, h) image; a box thinner than ``min_side`` is widened around its centre."""
    w, h = size
    b = np.array([np.clip(box[0], 0, w), np.clip(box[1], 0, h), np.clip(box[2], 0, w), np.clip(box[3], 0, h)])
    for lo, hi, lim in ((0, 2, w), (1, 3, h)):
        if b[hi] - b[lo] < min_side:
            c = min(max((b[lo] + b[hi]) / 2, min_side / 2), lim - min_side / 2)
            b[lo], b[hi] = c - min_side / 2, c + min_side / 2
    return b


def initial_boxes(n: int, edges: Sequence[Edge]) -> list[np.ndarray | None]:
    """Initial box of each node (Gordo et al. 2016, Sec. 4.1): the geometric median of the rectangles around
    its verified keypoints, one rectangle per verified pair it takes part in (``None`` without any)."""
    per: list[list[np.ndarray]] = [[] for _ in range(n)]
    for e in edges:
        per[e.i].append(e.box_i)
        per[e.j].append(e.box_j)
    return [geometric_median(np.stack(b)) if b else None for b in per]


def diffuse_boxes(boxes: Sequence[np.ndarray | None], edges: Sequence[Edge], sizes: Sequence[tuple[int, int]],
                  alpha: float = 0.1, tol: float = 0.05, max_iter: int = 2000, mode: str = "moments",
                  weighted: bool = False, min_visible: float = 0.5) -> tuple[list[np.ndarray | None], int, bool]:
    """Box diffusion over the matching graph (Gordo et al. 2016, Sec. 4.1).

    Each round, every node j with neighbours gets the predictions ``A_ij B_i`` (neighbour i's box projected
    through the pair's affine with :func:`project_box`, clipped to image j of size ``sizes[j]`` = (w, h)),
    merges them with the geometric median ``M_j`` and moves ``B_j <- (1 - alpha) B_j + alpha M_j`` (all
    nodes at once).  Stops when no coordinate moves more than ``tol`` pixels, or after ``max_iter`` rounds.

    Two options beyond the paper: ``weighted`` weighs each prediction by the pair's inlier count in the
    median; ``min_visible`` (default 0.5) ignores a prediction when less than that share of it lies inside
    image j -- on Paris landmarks, where affine models of different facades do not agree around a cycle,
    such predictions otherwise push boxes out of the frame (4 Paris landmark groups: mean IoU with the 9
    ground-truth query boxes 0.40 without, 0.47 with).  A node left without predictions keeps its box.
    Returns (final boxes, rounds run, converged).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    n = len(boxes)
    if len(sizes) != n:
        raise ValueError(f"diffuse_boxes: {n} boxes but {len(sizes)} image sizes")
    src, dst, aff, sc = [], [], [], []  # directed: prediction of dst from src
    for e in edges:
        src += [e.i, e.j]
        dst += [e.j, e.i]
        aff += [e.affine, e.inverse]
        sc += [float(e.score)] * 2
    for j in set(dst):
        if boxes[j] is None:
            raise ValueError(f"diffuse_boxes: node {j} has edges but no initial box")
    out = [None if b is None else np.asarray(b, dtype=np.float64).copy() for b in boxes]
    if not src:
        return out, 0, True
    nodes = sorted(set(dst))
    pos = {v: k for k, v in enumerate(nodes)}
    B = np.stack([out[v] for v in nodes])  # (M, 4)
    s_, d_ = np.array([pos[v] for v in src]), np.array([pos[v] for v in dst])
    A = np.stack(aff)  # (E, 2, 3)
    wh = np.array([sizes[v] for v in nodes], dtype=np.float64)
    lim = np.concatenate([wh, wh], axis=1)[d_]  # (E, 4): clip limits in the target image
    # Pad each node's incoming predictions into (M, K, 4).
    order = np.argsort(d_, kind="stable")
    counts = np.bincount(d_, minlength=len(nodes))
    K = int(counts.max())
    slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    rows, cols = d_[order], slot
    w_edge = np.asarray(sc)[order] if weighted else np.ones(len(order))
    w = np.zeros((len(nodes), K))
    preds = np.zeros((len(nodes), K, 4))
    merged = None
    it, converged = 0, False
    while it < max_iter and not converged:
        it += 1
        raw = project_box(B[s_], A, mode=mode)
        P = np.clip(raw, 0.0, lim)
        w[rows, cols] = w_edge
        if min_visible > 0:
            area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
            vis = area(P) / np.maximum(area(raw), 1e-12)
            w[rows, cols] = np.where(vis[order] >= min_visible, w_edge, 0.0)
        preds[rows, cols] = P[order]
        has = w.sum(1) > 0
        if merged is None:
            merged = B.copy()
        if has.any():
            merged[has] = geometric_median_batch(preds[has], w[has], tol=1e-5, max_iter=5, init=merged[has])
        merged[~has] = B[~has]
        new = (1 - alpha) * B + alpha * merged
        converged = float(np.abs(new - B).max()) <= tol
        B = new
    for k, v in enumerate(nodes):
        out[v] = B[k]
    return out, it, converged


# ----------------------------------------------------------------------------------------------------------
# One group, a whole training set
# ----------------------------------------------------------------------------------------------------------

@dataclass
class CleaningParams:
    """Parameters of :func:`clean_and_box` (written into the boxes file's header)."""

    max_side: int = 512
    max_keypoints: int = 2000
    ratio: float = 0.8
    ransac_px: float = 6.0
    min_inliers: int = 10
    max_scale: float = 8.0
    max_anisotropy: float = 4.0
    alpha: float = 0.1
    tol_px: float = 0.05
    max_iter: int = 2000
    projection: str = "moments"
    min_visible: float = 0.5
    weighted: bool = False

    def __post_init__(self) -> None:
        checks = [("max_side", self.max_side > 0), ("max_keypoints", self.max_keypoints >= 0),
                  ("ratio", 0 < self.ratio < 1), ("ransac_px", self.ransac_px > 0),
                  ("min_inliers", self.min_inliers >= 3), ("max_scale", self.max_scale >= 1),
                  ("max_anisotropy", self.max_anisotropy >= 1), ("alpha", 0 < self.alpha <= 1),
                  ("tol_px", self.tol_px > 0), ("max_iter", self.max_iter >= 1),
                  ("projection", self.projection in ("moments", "corners")),
                  ("min_visible", 0 <= self.min_visible <= 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"cleaning parameter {name}={getattr(self, name)!r} is out of range")

    def match_kw(self) -> dict[str, float]:
        return {"ratio": self.ratio, "ransac_px": self.ransac_px, "max_scale": self.max_scale,
                "max_anisotropy": self.max_anisotropy}


@dataclass
class GroupResult:
    """One group after cleaning: ``kept`` nodes (the largest component, if it has >= 2 images), the
    boxes in original pixels (``None`` for dropped images), diffusion rounds."""

    kept: np.ndarray
    component_size: np.ndarray
    edges: list[Edge]
    initial: list[np.ndarray | None]
    final: list[np.ndarray | None]
    pairs: int
    rounds: int
    converged: bool
    seconds_matching: float = 0.0
    seconds_diffusion: float = 0.0


def clean_group(features: Sequence[SiftFeatures], params: CleaningParams | None = None,
                on_pair: Callable[[int, int, PairMatch], None] | None = None,
                device: str | None = None) -> GroupResult:
    """Match, build the graph, keep its largest component (>= 2 images) and estimate the boxes of one group
    (``device``: where the ratio test's distances are computed, see :func:`ratio_matches`)."""
    p = params or CleaningParams()
    n = len(features)
    t0 = time.perf_counter()
    edges = matching_graph(features, min_inliers=p.min_inliers, on_pair=on_pair, device=device, **p.match_kw())
    t1 = time.perf_counter()
    nodes, comp = largest_component(n, edges)
    if len(nodes) < 2:
        nodes = np.zeros(0, np.int64)
    keep = set(nodes.tolist())
    kedges = [e for e in edges if e.i in keep and e.j in keep]
    sizes = [f.size for f in features]
    init = initial_boxes(n, kedges)
    init = [None if b is None else _clip(b, sizes[k]) for k, b in enumerate(init)]
    final, rounds, conv = diffuse_boxes(init, kedges, sizes, alpha=p.alpha, tol=p.tol_px, max_iter=p.max_iter,
                                       mode=p.projection, min_visible=p.min_visible, weighted=p.weighted)
    final = [None if b is None else _clip(b, sizes[k]) for k, b in enumerate(final)]
    return GroupResult(nodes, comp, edges, init, final, n * (n - 1) // 2, rounds, conv, t1 - t0,
                       time.perf_counter() - t1)


@dataclass
class CleaningResult:
    """Per-image records of :func:`clean_and_box` (keys: paths relative to ``root``) and run statistics."""

    root: str
    params: CleaningParams
    images: dict[str, dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        return {"format": BOXES_FORMAT, "version": BOXES_VERSION, "root": self.root,
                "method": "Gordo et al. 2016, Sec. 4.1: SIFT + ratio test + affine RANSAC, largest connected "
                          "component per group, box diffusion with geometric-median merging",
                "box_convention": "[x0, y0, x1, y1] in original-image pixels", "params": asdict(self.params)}


def _relpath(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"image {path} is not inside the root folder {root}") from None


def clean_and_box(training_set, root: str | os.PathLike | None = None, params: CleaningParams | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  device: str | None = None) -> CleaningResult:
    """Clean every group of ``training_set`` (a :class:`~instance_search.eval.datasets.splits.TrainingSet`, or
    anything with ``paths``, ``labels`` and optionally ``source``) and estimate boxes (Gordo et al. 2016,
    Sec. 4.1).  ``root`` (default: the shared data folder) is what the paths in the result are relative to;
    SIFT features are cached per image (in memory, and in ``cache_dir`` when given).  A tqdm bar counts
    images.  Unreadable images are dropped with their error in ``stats['failed']``.  ``device``: where the
    ratio test's descriptor distances are computed (None / ``"cpu"``: NumPy; ``"cuda"``: torch on the GPU)."""
    from tqdm import tqdm

    from ..images import ImageError

    p = params or CleaningParams()
    if device is not None and str(device) != "cpu":
        from .triplet import check_device

        device = str(check_device(device))  # a GPU that is not there is refused before any SIFT work
    paths = [Path(x) for x in training_set.paths]
    labels = np.asarray(training_set.labels).ravel()
    if len(paths) != len(labels):
        raise ValueError(f"training set has {len(paths)} paths but {len(labels)} labels")
    source = list(getattr(training_set, "source", None) or ["images"] * len(paths))
    if root is None:
        from ..eval.datasets.benchmarks import find_shared_data

        root = find_shared_data()
        if root is None:
            raise FileNotFoundError("clean_and_box: no root given and no shared data folder found")
    root = Path(root)
    rel = [_relpath(x, root) for x in paths]
    if len(set(rel)) != len(rel):
        raise ValueError("training set lists the same image more than once")
    cache = SiftCache(cache_dir, p.max_side, p.max_keypoints)
    groups: dict[int, list[int]] = {}
    for k, g in enumerate(labels.tolist()):
        groups.setdefault(int(g), []).append(k)
    images: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    n_pairs = n_verified = 0
    rounds, not_converged = [], 0
    t0 = time.perf_counter()
    t_sift = t_match = t_diff = 0.0

    def on_pair(i, j, m):
        nonlocal n_pairs, n_verified
        n_pairs += 1
        n_verified += int(m.affine is not None and m.score >= p.min_inliers)

    bar = tqdm(total=len(paths), desc="cleaning", unit="img", disable=not progress)
    for g, idx in groups.items():
        feats, ok = [], []
        ts = time.perf_counter()
        for k in idx:
            try:
                feats.append(cache.get(paths[k]))
                ok.append(k)
            except ImageError as exc:
                failed.append(str(exc))
                images[rel[k]] = _record(g, False, None, None, 0)
        t_sift += time.perf_counter() - ts
        res = clean_group(feats, p, on_pair=on_pair, device=device)
        rounds.append(res.rounds)
        t_match += res.seconds_matching
        t_diff += res.seconds_diffusion
        not_converged += int(not res.converged)
        kept = set(res.kept.tolist())
        for a, k in enumerate(ok):
            images[rel[k]] = _record(g, a in kept, res.final[a] if a in kept else None,
                                     res.initial[a] if a in kept else None,
                                     int(res.component_size[a]) if len(res.component_size) else 0)
        bar.update(len(idx))
        bar.set_postfix(kept=sum(int(r["kept"]) for r in images.values()), pairs=n_pairs, verified=n_verified,
                        refresh=False)
    bar.close()
    per_source: dict[str, dict[str, int]] = {}
    for k, r in enumerate(rel):
        s = per_source.setdefault(source[k], {"images": 0, "kept": 0, "groups": 0, "groups_kept": 0})
        s["images"] += 1
        s["kept"] += int(images[r]["kept"])
    for g, idx in groups.items():
        s = per_source[source[idx[0]]]
        s["groups"] += 1
        s["groups_kept"] += int(any(images[rel[k]]["kept"] for k in idx))
    stats = {"images": len(paths), "kept": sum(int(r["kept"]) for r in images.values()), "groups": len(groups),
             "pairs_matched": n_pairs, "pairs_verified": n_verified, "per_source": per_source,
             "diffusion_rounds_max": int(max(rounds) if rounds else 0),
             "diffusion_rounds_median": float(np.median(rounds)) if rounds else 0.0,
             "groups_not_converged": not_converged, "failed": failed,
             "seconds_total": round(time.perf_counter() - t0, 2), "seconds_sift": round(t_sift, 2),
             "seconds_matching": round(t_match, 2), "seconds_diffusion": round(t_diff, 2),
             "sift_computed": cache.computed, "sift_from_cache": cache.hits}
    return CleaningResult(str(root), p, {r: images[r] for r in rel}, stats)


def _record(group: int, kept: bool, box, initial, comp: int) -> dict[str, Any]:
    def r(b):
        return None if b is None else [round(float(v), 2) for v in b]

    return {"group": int(group), "kept": bool(kept), "box": r(box), "initial_box": r(initial),
            "component_size": int(comp)}


def groups_from_folder(folder: str | os.PathLike):
    """A folder of groups: every sub-folder is one group (its images, any depth below it, are one object or
    place).  Returns a :class:`~instance_search.eval.datasets.splits.TrainingSet` with ``source`` = sub-folder name."""
    from ..eval.datasets.splits import TrainingSet
    from ..images import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder of groups not found: {folder}")
    paths, labels, source = [], [], []
    subs = sorted(d for d in folder.iterdir() if d.is_dir())
    for g, d in enumerate(subs):
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f)
                labels.append(g)
                source.append(d.name)
    if not paths:
        raise FileNotFoundError(f"{folder}: no images in sub-folders (expected one sub-folder per group)")
    return TrainingSet(paths, np.asarray(labels, dtype=np.int64), source)


# ----------------------------------------------------------------------------------------------------------
# The boxes file
# ----------------------------------------------------------------------------------------------------------

class BoxesFileError(FileFormatError):
    """A boxes file that is missing, not JSON, or does not follow the format; the message names the file
    and the entry."""


def save_boxes(result: CleaningResult, path: str | os.PathLike) -> Path:
    """Write the boxes file: ``{"header": {...parameters...}, "images": {relative path: {"group", "kept",
    "box", "initial_box", "component_size"}}}`` (atomically: temporary file, fsync, rename)."""
    from ..io import atomic_write_bytes

    doc = {"header": result.header(), "images": result.images}
    _validate(doc, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
    return path


def _check_box(b, where: str, name: str) -> None:
    if b is None:
        return
    if not isinstance(b, list) or len(b) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in b):
        raise BoxesFileError(f"{where}: {name} must be null or [x0, y0, x1, y1] (four numbers), got {b!r}")
    if not all(math.isfinite(v) for v in b):
        raise BoxesFileError(f"{where}: {name} has non-finite coordinates {b!r}")
    if b[0] < 0 or b[1] < 0 or not (b[2] > b[0] and b[3] > b[1]):
        raise BoxesFileError(f"{where}: {name} {b!r} is empty, inverted or negative (need 0 <= x0 < x1, 0 <= y0 < y1)")


def _validate(doc: Any, name: str) -> None:
    if not isinstance(doc, dict) or set(doc) != {"header", "images"}:
        raise BoxesFileError(f"{name}: expected a JSON object with exactly 'header' and 'images'")
    h = doc["header"]
    if not isinstance(h, dict) or h.get("format") != BOXES_FORMAT:
        raise BoxesFileError(f"{name}: header.format must be {BOXES_FORMAT!r}")
    if h.get("version") != BOXES_VERSION:
        raise BoxesFileError(f"{name}: unsupported version {h.get('version')!r} (this code reads {BOXES_VERSION})")
    if not isinstance(h.get("params"), dict):
        raise BoxesFileError(f"{name}: header.params missing")
    imgs = doc["images"]
    if not isinstance(imgs, dict):
        raise BoxesFileError(f"{name}: 'images' must be an object mapping relative paths to entries")
    need = {"group", "kept", "box", "initial_box", "component_size"}
    for rel, e in imgs.items():
        where = f"{name}: images[{rel!r}]"
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BoxesFileError(f"{where}: path must be relative to the data folder, without '..'")
        if not isinstance(e, dict) or set(e) != need:
            got = sorted(e) if isinstance(e, dict) else type(e).__name__
            raise BoxesFileError(f"{where}: expected keys {sorted(need)}, got {got}")
        if not isinstance(e["group"], int) or isinstance(e["group"], bool):
            raise BoxesFileError(f"{where}: group must be an integer, got {e['group']!r}")
        if not isinstance(e["kept"], bool):
            raise BoxesFileError(f"{where}: kept must be true or false, got {e['kept']!r}")
        if not isinstance(e["component_size"], int) or isinstance(e["component_size"], bool) or e["component_size"] < 0:
            raise BoxesFileError(f"{where}: component_size must be a non-negative integer, got {e['component_size']!r}")
        _check_box(e["box"], where, "box")
        _check_box(e["initial_box"], where, "initial_box")
        if e["kept"] and (e["box"] is None or e["initial_box"] is None):
            raise BoxesFileError(f"{where}: a kept image needs a box and an initial_box")
        if not e["kept"] and e["box"] is not None:
            raise BoxesFileError(f"{where}: a dropped image (kept false) must have box null")
        if e["kept"] and e["component_size"] < 2:
            raise BoxesFileError(f"{where}: a kept image must be in a component of at least 2 images")


def load_boxes(path: str | os.PathLike, root: str | os.PathLike | None = None,
               kept_only: bool = False) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read and validate a boxes file written by :func:`save_boxes`.  Returns (header, images).

    With ``root``, every image must exist under it (checked) and keys stay relative; with ``kept_only``
    only the kept images (those with a box) are returned.  Raises :class:`BoxesFileError` naming the file
    and the offending entry.
    """
    path = Path(path)
    if not path.is_file():
        raise BoxesFileError(f"boxes file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BoxesFileError(f"{path}: not valid JSON ({exc})") from exc
    _validate(doc, str(path))
    imgs = doc["images"]
    if root is not None:
        missing = [r for r in imgs if not (Path(root) / r).is_file()]
        if missing:
            raise BoxesFileError(f"{path}: {len(missing)} images not found under {root}, e.g. {missing[:3]}")
    if kept_only:
        imgs = {r: e for r, e in imgs.items() if e["kept"]}
    return doc["header"], imgs
