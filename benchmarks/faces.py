"""Throughput of the face-analysis stage per backend and batch size, Ray stage vs direct call,
and the identity separation of the dlib embedding on the real pairs.

    python benchmarks/faces.py                       # about 3 minutes on 2 cores
    python benchmarks/faces.py --backends dlib --batch-sizes 1 8

Inputs: the 43 labelled photos of ``../shared/data/faces`` (20 KB-600 KB JPEGs, 0.1-3.3 MP;
read from shared/, never copied). For every backend and batch size the ``FaceAnalyzer`` actor is
called directly on all photos (after one warm-up batch), images/s best and median of
``--repeats``. The ``dlib`` backend then runs as a Ray Data actor pool of one; its steady-state
rate (after the first batch) is reported beside the direct rate at the same batch size
(``ray_vs_direct``). The ``deepface`` backend uses random weights written by DeepFace's own
builders into a temporary ``DEEPFACE_HOME`` (1.6 GB; same FLOPs as the trained weights), on the
first ``--deepface-images`` photos, one pass per batch size.

Identity: cosine similarities of the dlib embeddings over the 41 same-identity and 779
different-identity pairs of ``pairs.csv``: ROC AUC, the ranges, and the threshold in the middle
of the gap (``udfs.faces.IDENTITY_THRESHOLDS['dlib']``).

Results: ``benchmarks/results/faces-<date>.json`` with the machine description.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import bench_env  # noqa: E402,F401  (first: repository on sys.path, offline defaults)
from bench_env import machine  # noqa: E402

ROOT = Path(bench_env.ROOT)

from vision import bench_direct, bench_ray, numpy_batch, results_path  # noqa: E402

FACES = ROOT.parent / "shared" / "data" / "faces"
SPECS = {"dlib": {"backend": "dlib", "model": "pkg:face_recognition_models/models"},
         "deepface": {"backend": "deepface", "model": "VGG-Face"}}


def identity_separation(analyzer) -> dict:
    """AUC and ranges of dlib identity cosines on the real pairs, and the mid-gap threshold."""
    from sklearn.metrics import roc_auc_score

    from udfs.faces import cosine_similarity

    labels = list(csv.DictReader(open(FACES / "labels.csv")))
    out = analyzer(numpy_batch([{"id": r["file"], "image": str(FACES / r["file"])} for r in labels]))
    emb = dict(zip(out["id"], out["identity_embedding"]))
    counts_ok = sum(int(r["n_faces"]) == c for r, c in zip(labels, out["face_count"]))
    same, diff = [], []
    for p in csv.DictReader(open(FACES / "pairs.csv")):
        s = cosine_similarity(emb[p["file_a"]], emb[p["file_b"]])
        (same if p["same_identity"] == "yes" else diff).append(s)
    return {"images": len(labels), "face_count_matches_labels": counts_ok,
            "same_pairs": len(same), "different_pairs": len(diff),
            "roc_auc": round(roc_auc_score([1] * len(same) + [0] * len(diff), same + diff), 4),
            "same_min_max": [round(min(same), 4), round(max(same), 4)],
            "different_min_max": [round(min(diff), 4), round(max(diff), 4)],
            "mid_gap_threshold": round((min(same) + max(diff)) / 2, 4) if min(same) > max(diff) else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["dlib", "deepface"], choices=sorted(SPECS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--deepface-images", type=int, default=12,
                    help="photos for the deepface backend (about 1 s per photo per pass on 2 cores)")
    ap.add_argument("--ray-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from actors.faces import FaceAnalyzer
    from actors.models import resolve

    files = [r["file"] for r in csv.DictReader(open(FACES / "labels.csv"))]
    rows = [{"id": f, "image": str(FACES / f)} for f in files]
    results: dict = {"machine": machine(), "config": vars(args) | {"out": str(args.out)}, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="faces-bench-") as tmp:
        for backend in args.backends:
            if backend == "deepface":
                from tests.deepface_weights import write_random_deepface_weights

                write_random_deepface_weights(Path(tmp))
                os.environ["DEEPFACE_HOME"] = tmp
            model = resolve(SPECS[backend]).model_dump()
            analyzer = FaceAnalyzer(model=model, params={"num_threads": args.threads})
            print(f"{backend}:", flush=True)
            subset = rows if backend == "dlib" else rows[:args.deepface_images]
            entry = {"images": len(subset), "direct": bench_direct(analyzer, subset, args.batch_sizes,
                                                                   args.repeats if backend == "dlib" else 1)}
            if backend == "dlib":
                entry["identity"] = identity_separation(analyzer)
                print(f"  identity: {entry['identity']}", flush=True)
                import ray

                os.environ.setdefault("MMSYNTH_CACHE", str(Path(tmp) / "cache"))
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"KERAS_BACKEND": "torch", "OMP_WAIT_POLICY": "PASSIVE"}})
                stage = {"cls": FaceAnalyzer, "params": {"num_threads": args.threads}}
                ray_entry = bench_ray(stage, model, rows, args.ray_batch_size, num_cpus=1, num_gpus=0)
                direct = entry["direct"].get(str(args.ray_batch_size))
                if direct:
                    ray_entry["ray_vs_direct"] = round(ray_entry["steady_images_per_s"] /
                                                       direct["images_per_s_best"], 3)
                entry["ray"] = ray_entry
                print(f"  ray: {ray_entry}", flush=True)
                ray.shutdown()
            results["backends"][backend] = entry
            del analyzer
    path = results_path(args.out, "faces")
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
