"""A tiny REAL feature store for train/evaluate/export tests (written through FeatureStore).

Teachers are a learnable function of the student: a 3D (trilinear) resample of the student grid
to the target grid followed by a fixed linear map, plus a little noise; ViViT's single token is the
mean over tokens through a linear map. Labels shift a few student channels, so a head can learn
them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.featurestore import FeatureStore
from pipeline.storage import Storage
from tokconv.targets import TargetSpec

STUDENT = TargetSpec("student", 32, 16, (2, 4, 4))
TEACHERS = {"videomae": TargetSpec("videomae", 18, 12, (2, 3, 3)),
            "timesformer": TargetSpec("timesformer", 36, 12, (4, 3, 3)),
            "vivit": TargetSpec("vivit", 1, 12, None)}
SPECS = {"student": STUDENT, **TEACHERS}
CLASS_NAMES = ["a", "b", "c"]


def teacher_of(student: torch.Tensor, spec: TargetSpec, weight: torch.Tensor) -> torch.Tensor:
    """student (B, N, Ds) -> (B, spec.tokens, spec.dim)."""
    b, _, d = student.shape
    if spec.grid is None:
        return student.mean(1, keepdim=True) @ weight
    vol = student.transpose(1, 2).reshape(b, d, *STUDENT.grid)
    vol = F.interpolate(vol, size=spec.grid, mode="trilinear", align_corners=False)
    return vol.flatten(2).transpose(1, 2) @ weight


def make_tiny_store(storage: Storage, name: str = "features", *, n_train: int = 24, n_val: int = 8,
                    shard_clips: int = 8, seed: int = 0, dtype=np.float16,
                    codec: str | None = None) -> FeatureStore:
    """``codec``: ``extract.codec`` (None: raw)."""
    g = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(STUDENT.dim, s.dim, generator=g) / STUDENT.dim ** 0.5
               for k, s in TEACHERS.items()}
    n = n_train + n_val
    labels = torch.randint(0, len(CLASS_NAMES), (n,), generator=g)
    student = torch.randn(n, STUDENT.tokens, STUDENT.dim, generator=g)
    student[torch.arange(n), :, labels] += 2.0  # class signal on channel `label`
    feats = {"student": student}
    for k, s in TEACHERS.items():
        t = teacher_of(student, s, weights[k]) * 2.0 + 0.5
        feats[k] = t + 0.05 * torch.randn(t.shape, generator=g)
    split = np.array(["train"] * n_train + ["val"] * n_val)
    store = FeatureStore(storage, name)
    store.write_meta(specs=SPECS, dtype=np.dtype(dtype).name, class_names=CLASS_NAMES,
                     codec=codec)
    for i in range(0, n, shard_clips):
        sl = slice(i, min(i + shard_clips, n))
        store.write_shard({
            "video_id": [f"v{j:04d}" for j in range(sl.start, sl.stop)],
            "clip_index": np.zeros(sl.stop - sl.start, np.int32),
            "label_index": labels[sl].numpy().astype(np.int32),
            "split": split[sl],
            **{k: v[sl].numpy().astype(dtype) for k, v in feats.items()},
        })
    store.compute_stats()
    return store


def publish_checkpoint(storage: Storage, job, seed: int = 0) -> str:
    """A real converter + head (``build_models`` from ``job.train``, initialised with ``seed``)
    saved in tokconv.io format as the run's checkpoint, with the runs/<job>/train.json pointer that
    evaluate/export read (what a training run leaves behind, without Ray). Returns the rel path."""
    import os
    import tempfile

    from pipeline.artifacts import job_run_dir, save_model_dir, write_trained
    from pipeline.train import build_models

    torch.manual_seed(seed)
    conv, head = build_models(job.train, SPECS, len(CLASS_NAMES))
    rel = f"runs/{job.name}/ckpt-{seed}"
    storage.fs.makedirs(storage.path(rel), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(conv, head, tmp)
        for f in os.listdir(tmp):
            storage.fs.put_file(os.path.join(tmp, f), storage.path(rel, f))
    write_trained(storage, job_run_dir(job.name), {
        "checkpoint": storage.url(rel), "checkpoint_rel": rel, "converter": job.train.converter,
        "metrics": {}})
    return rel
