"""The ID embedding path, as in real pipelines: detect the face, align a 112x112 crop, embed it with an
insightface ``ArcFaceONNX`` (here: phi_cond exported to ONNX, loaded exactly as antelopev2's recognizer)."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.adapter import VIEWS
from ..core.files import atomic_write, write_npz
from ..core.imaging import align_faces, to_tensor, to_uint8
from ..world import faceless
from ..world import toyfaces as world
from ..world.data import as_image_batch
from ..world.toyfaces import render
from . import checkpoints

ONNX_SIZE = 112


def export_recognizer_onnx(recognizer: nn.Module, path: Path) -> Path:
    """Export a FaceRecognizer so that ``insightface.model_zoo.get_model(path)`` returns an ``ArcFaceONNX``.

    The graph takes (N, 3, 112, 112) normalised RGB, as insightface feeds it, and resizes to 32x32 inside.
    The module must be in eval mode: the exporter traces BatchNorm in the mode of the module it is given.
    """
    path = Path(path)
    recognizer = recognizer.eval().cpu()
    dummy = torch.zeros(1, 3, ONNX_SIZE, ONNX_SIZE)

    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(recognizer, (dummy,), str(tmp), input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                              dynamo=False)
    return atomic_write(path, write)


def load_insightface_recognizer(path: Path, threads: int | None = None):
    """insightface's own loader; the returned object is an ``ArcFaceONNX``, as for antelopev2's glintr100.
    ``threads``: onnxruntime's threads (default: its own choice, every core), 1 in worker processes."""
    from insightface.model_zoo import get_model
    kwargs = {}
    if threads:
        import onnxruntime
        kwargs["sess_options"] = options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    model = get_model(str(path), providers=["CPUExecutionProvider"], **kwargs)
    if model is None or type(model).__name__ != "ArcFaceONNX":
        raise RuntimeError(f"insightface did not load {path} as an ArcFaceONNX recognizer (got {type(model).__name__})")
    return model


def crops_for_insightface(images_u8: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Aligned 112x112 crops as insightface wants them: BGR uint8 (what ``norm_crop`` would return)."""
    crops = align_faces(to_tensor(images_u8), torch.as_tensor(boxes, dtype=torch.float32), size=ONNX_SIZE)
    return [c[:, :, ::-1].copy() for c in to_uint8(crops)]


FACE_THRESHOLD = 0.5  # the face check's probability above which an image shows a face
# the face check refuses references only when, on images it never trained on, it accepted at least this share of
# faces and rejected at least this share of every faceless kind (pretrain measures both: ``face_check_rates``)
FACE_CHECK_QUALIFIES = 0.99


@torch.no_grad()
def face_check_rates(model: nn.Module, n: int = 400, seed: int = 0) -> dict:
    """The face check measured where it never trained: ``faces_accepted`` on renders of held-out identities (random
    attributes), ``faceless_rejected`` = the lowest rejection rate over ``faceless.CHECK_KINDS``, and each kind's."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    faces = render(world.HELDOUT_IDS[np.arange(n) % len(world.HELDOUT_IDS)],
                   world.sample_attributes(np.random.default_rng(seed), n), np.arange(n) + 10_000 * (seed + 1))
    p_face = torch.sigmoid(model(to_tensor(faces.images).to(device))).cpu()
    rejected = {kind: float((torch.sigmoid(model(x.to(device))).cpu() < FACE_THRESHOLD).float().mean())
                for kind, x in faceless.check_faceless(n, gen).items()}
    return {"faces_accepted": float((p_face >= FACE_THRESHOLD).float().mean()),
            "faceless_rejected": min(rejected.values()), "faceless_rejected_by_kind": rejected}


class FaceAnalysis:
    """detector + phi_cond through insightface: ``embed(images) -> (B, 512)`` ID embeddings; the face check
    (``face_scores``, ``require_faces``) plays the detector's face score, so an image with no face is refused.

    ``images``: a PIL image, a uint8 array (H, W, 3) or (B, H, W, 3), or a float tensor (B, 3, H, W) in [-1, 1].
    """

    def __init__(self, models_dir: Path | None = None, recognizer: str = "phi_cond", threads: int | None = None):
        self.models_dir = Path(models_dir) if models_dir is not None else checkpoints.default_models_dir()
        self.detector = checkpoints.load_model("detector", self.models_dir)
        self.recognizer_name = recognizer
        self.recognizer = load_insightface_recognizer(checkpoints.verified_file(f"{recognizer}_onnx", self.models_dir),
                                                      threads)
        self._face_check = None  # loaded on first use
        self._warned = False

    def _check_entry(self) -> dict | None:
        return checkpoints.read_manifest(self.models_dir).get("models", {}).get("face_check")

    @torch.no_grad()
    def face_scores(self, images) -> np.ndarray | None:
        """(B,) probability that each image shows a face; None for models without a face check."""
        if self._check_entry() is None:
            return None
        if self._face_check is None:
            self._face_check = checkpoints.load_model("face_check", self.models_dir)
        return torch.sigmoid(self._face_check(to_tensor(as_image_batch(images)))).numpy()

    def require_faces(self, images, name: str = "reference") -> None:
        """A ValueError naming every image with no face. Models whose face check did not qualify (the smoke
        profile's, or models from before it existed) check nothing and say so once."""
        entry = self._check_entry()
        metrics = (entry or {}).get("metrics", {})
        if min(metrics.get("faces_accepted", 0.0), metrics.get("faceless_rejected", 0.0)) < FACE_CHECK_QUALIFIES:
            if not self._warned:
                why = ("have no face check" if entry is None else "have a face check too weak to trust (faces accepted "
                       f"{metrics.get('faces_accepted', 0):.0%}, faceless images rejected "
                       f"{metrics.get('faceless_rejected', 0):.0%} on images it never saw)")
                warnings.warn(f"the models in {self.models_dir} {why}: references are not checked for a face; "
                              "`pulid-lab pretrain --profile paper --only face_check --resume` trains one", stacklevel=3)
                self._warned = True
            return
        scores = self.face_scores(images)
        missing = np.flatnonzero(scores < FACE_THRESHOLD)
        if len(missing):
            listed = ", ".join(f"{i} ({scores[i]:.2f})" for i in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"no face in {name} image(s) {listed} (face check score below {FACE_THRESHOLD}): give a "
                             "portrait with one visible face, e.g. pulid_lab.lessons.widgets.reference_for(identity)")

    @torch.no_grad()
    def detect(self, images) -> np.ndarray:
        """Face boxes (B, 3) = centre x, centre y, half-height s in pixels."""
        images = as_image_batch(images)
        return self.detector(to_tensor(images)).numpy()

    def embed(self, images, boxes: np.ndarray | None = None) -> np.ndarray:
        images = as_image_batch(images)
        boxes = self.detect(images) if boxes is None else boxes
        crops = crops_for_insightface(images, boxes)
        out = [self.recognizer.get_feat(crops[i:i + 256]) for i in range(0, len(crops), 256)]
        return np.concatenate(out)


class IDConditioner:
    """Reference image(s) -> (phi_cond embedding (B, 512), image-encoder hidden states) — all frozen.

    ``view='crop'`` feeds the image encoder the aligned face crop (as the official code feeds EVA-CLIP the
    aligned face); ``view='full'`` feeds the whole reference image (more non-ID information leaks in).
    """

    def __init__(self, models_dir: Path | None = None, view: str = "crop", device=None):
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.view = view
        self.device = torch.device(device or "cpu")
        self.faces = FaceAnalysis(models_dir)
        self.image_encoder = checkpoints.load_model("image_encoder", models_dir, self.device).requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images, check_faces: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``check_faces``: refuse images with no face first (references a user gives; renders always have one)."""
        images = as_image_batch(images)
        if check_faces:
            self.faces.require_faces(images)
        boxes = self.faces.detect(images)
        return self.encode(images, boxes, self.faces.embed(images, boxes))

    @torch.no_grad()
    def encode(self, images: np.ndarray, boxes: np.ndarray, embeddings: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same, from face boxes (B, 3) and phi_cond embeddings (B, 512) already computed for ``images``."""
        emb = torch.from_numpy(np.asarray(embeddings)).float().to(self.device)
        x = to_tensor(images).to(self.device)
        if self.view == "crop":
            x = align_faces(x, torch.from_numpy(np.asarray(boxes)).to(self.device))
        return emb, self.image_encoder.hidden_states(x)


FACES_CHUNK = 16  # rows per detector / phi_cond call when a bank's faces are computed (fixed: see BankFaces)


class BankFaces:
    """Face boxes (N, 3) and phi_cond embeddings (N, D) of a training bank's images, computed the first time a row is
    asked for and kept; once every row is known they are cached on disk by content (the images' bytes and the
    detector's and phi_cond's sha256), so later stages and runs on the same bank load them. Rows are computed in fixed
    chunks of FACES_CHUNK, so a row's values never depend on the rows drawn with it (the detector's last bits depend
    on the batch size) nor on the order in which rows are asked for: a resumed run sees the same bits."""

    def __init__(self, images: np.ndarray, faces: FaceAnalysis):
        from ..world.data import cache_dir
        self.images, self.faces = images, faces  # images: (N, H, W, 3) uint8
        manifest = checkpoints.read_manifest(faces.models_dir)  # the key: images, models, chunk size
        models = manifest["models"]["detector"]["sha256"] + manifest["files"][f"{faces.recognizer_name}_onnx"]["sha256"]
        key = hashlib.sha256(np.ascontiguousarray(images).tobytes() + f"{models}|{FACES_CHUNK}".encode()).hexdigest()[:16]
        self.path = cache_dir() / f"faces-{key}.npz"
        self._known = np.zeros(-(-len(images) // FACES_CHUNK), bool)  # per chunk
        self.boxes = self.embeddings = None
        if self.path.exists():
            z = np.load(self.path)
            self.boxes, self.embeddings = z["boxes"], z["embeddings"]
            self._known[:] = True

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes, embeddings) of bank rows ``rows``."""
        rows = np.asarray(rows)
        self._compute(np.unique(rows // FACES_CHUNK))
        return self.boxes[rows], self.embeddings[rows]

    def all(self, progress: bool = False, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Every row's (boxes, embeddings), computed now where missing (and written to the disk cache); with
        ``workers`` > 1 in that many processes of one thread each (for a machine with many cores; a row's last bits
        may then differ from one computed with another thread count, which the cache makes moot)."""
        from tqdm.auto import tqdm
        missing = np.flatnonzero(~self._known)
        bar = dict(desc=f"faces of {len(self.images)} renders", leave=False, disable=not progress or not len(missing))
        if workers > 1 and len(missing) > workers:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            groups = np.array_split(missing, workers * 4)
            jobs = [(self.faces.models_dir, self.faces.recognizer_name, g, [self._chunk_images(c) for c in g])
                    for g in groups]
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for done in tqdm(pool.map(_faces_of_chunks, jobs), total=len(jobs), **bar):
                    for c, boxes, emb in done:
                        self._store(c, boxes, emb)
        for lo in tqdm(range(0, len(missing), 64), **bar):
            self._compute(missing[lo:lo + 64])  # whatever is still missing (all of it with one worker)
        return self.boxes, self.embeddings

    def _chunk_images(self, c: int) -> np.ndarray:
        return self.images[c * FACES_CHUNK:(c + 1) * FACES_CHUNK]

    def _compute(self, chunks: np.ndarray) -> None:
        for c in chunks[~self._known[chunks]]:
            part = self._chunk_images(c)
            boxes = self.faces.detect(part)
            self._store(c, boxes, self.faces.embed(part, boxes))

    def _store(self, c: int, boxes: np.ndarray, emb: np.ndarray) -> None:
        if self.boxes is None:
            self.boxes = np.zeros((len(self.images), boxes.shape[1]), boxes.dtype)
            self.embeddings = np.zeros((len(self.images), emb.shape[1]), emb.dtype)
        self.boxes[c * FACES_CHUNK:(c + 1) * FACES_CHUNK] = boxes
        self.embeddings[c * FACES_CHUNK:(c + 1) * FACES_CHUNK] = emb
        self._known[c] = True
        if self._known.all():
            self._save()

    def _save(self) -> None:
        write_npz(self.path, boxes=self.boxes, embeddings=self.embeddings)


def _faces_of_chunks(job) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """A worker process's share of ``BankFaces.all``: [(chunk, boxes, embeddings)], one thread for torch and
    onnxruntime (so that workers do not fight over the cores)."""
    models_dir, recognizer, chunks, images = job
    torch.set_num_threads(1)
    faces = FaceAnalysis(models_dir, recognizer, threads=1)
    out = []
    for c, part in zip(chunks, images):
        boxes = faces.detect(part)
        out.append((int(c), boxes, faces.embed(part, boxes)))
    return out


class RowConditioner:
    """An IDConditioner over the fixed images of a training bank: a row's face box and phi_cond embedding are computed
    once (``BankFaces``; both are frozen functions of a fixed image), so a training step runs only the image encoder,
    on its device. The detector and phi_cond run on the CPU through onnxruntime: 6% of a 2-core Stage 1 step, and
    most of a GPU step."""

    def __init__(self, conditioner: IDConditioner, images: np.ndarray):
        self.conditioner = conditioner
        self.faces = BankFaces(images, conditioner.faces)  # holds the images (N, H, W, 3) uint8

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rows = np.asarray(rows)
        boxes, embeddings = self.faces.rows(rows)
        return self.conditioner.encode(self.faces.images[rows], boxes, embeddings)


def embedding_dim_and_channels(models_dir: Path | None = None) -> tuple[int, tuple[int, ...]]:
    """(phi_cond embedding width, image-encoder hidden-state channels) of a models folder, for IDEncoderConfig."""
    manifest = checkpoints.read_manifest(Path(models_dir) if models_dir else checkpoints.default_models_dir())
    enc = manifest["models"]["image_encoder"]["config"]
    return manifest["models"]["phi_cond"]["config"].get("dim", 512), tuple(enc["widths"]) + (enc.get("dim", 256),)
