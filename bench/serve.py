"""bench suite `serve`: images/s through the registered model's pyfunc, on PyTorch and on onnxruntime, at
batch 1 and 64, against the loop a user writes by hand.

    python -m bench serve [--repeats 3] [--backbone efficientnet_lite0] [--image-size 64] [--weights default]

The requests are the bench data's images as JPEG files in memory (quality 90, encoded once, as photos
arrive); every contender decodes them from those bytes. Contenders, alternating per repeat, each in a fresh
spawned process:
  plain-eager-b{1,64}   PIL decode + torchvision Resize/CenterCrop/ToTensor/Normalize + the eager model
                        (harness.build_plain_transform; inference_mode, softmax), fed the raw bytes
  pyfunc-torch-b{1,64}  mlflow.pyfunc.load_model of the served model (integrations.serving, serve.runtime
                        torch) on a DataFrame column of base64 strings: what `mlflow models serve` hands it for
                        JSON; its rows carry label, probability, top 3, error
  pyfunc-onnx-b{1,64}   the same with serve.runtime onnx (model.onnx on onnxruntime, parity-checked)
images/s = images / wall time of every batch after one warm-up batch (base64 encoding is the client's and is
not timed; decoding it is the model's and is). The model is the backbone with a fresh head (the weights do
not change the speed). Target: pyfunc-onnx at batch 64 >= 1.5x plain-eager at batch 64. An adapter suite: it
needs mlflow, onnx, onnxscript and onnxruntime (`pip install -e .[pipeline,serve]`).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import harness

BATCHES = (1, 64)
TARGET_BATCH, TARGET_RATIO = 64, 1.5  # pyfunc-onnx-b64 images/s >= 1.5 x plain-eager-b64
IMAGES, TINY_IMAGES = 256, 16
JPEG_QUALITY = 90
RUNTIMES = ("torch", "onnx")


def check_ready(settings: harness.Settings) -> str | None:
    needed = ("mlflow", "onnx", "onnxscript", "onnxruntime")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    return f"needs {', '.join(missing)} (pip install -e .[pipeline,serve])" if missing else None


# ---- setting up (main process) ---------------------------------------------------------------------------

def write_requests(ctx: harness.Context, folder: Path, count: int) -> list[Path]:
    """The first `count` images of the bench data (in manifest order, repeated if fewer), as JPEG files."""
    from freezeflow.core.data.images import decode_rgb

    manifest = json.loads((ctx.prepared.root / "manifest.json").read_text())
    sources = [Path(manifest["dir"]) / name for name in manifest["files"]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        decode_rgb(sources[i % len(sources)], 10**9).save(path, format="JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def build_models(ctx: harness.Context, pool, folder: Path) -> dict:
    """The bundle (weights.npz, model.json, model.onnx) and one saved pyfunc per runtime, built in a worker:
    a child's ru_maxrss starts at its parent's, so the main process must stay small (peak RSS per contender)."""
    spec = harness.make_spec(ctx, "build", "serve", "head", 1) | {
        "runner": "bench.serve:run_build", "folder": str(folder), "backbone": ctx.settings.backbone,
        "weights": ctx.settings.weights, "image_size": ctx.settings.image_size,
        "prepared_dir": str(ctx.prepared.root)}
    return pool.submit(harness.run_contender, spec).result()


def run_build(spec: dict) -> dict:
    """In the worker: the model (the backbone with a fresh head), its bundle, the ONNX export, both pyfuncs."""
    from freezeflow.core.data.prepare import load_prepared
    from freezeflow.core.models.io import ModelInfo, save_bundle
    from freezeflow.core.models.registry import build_backbone, normalization
    from freezeflow.core.params import ServeParams
    from freezeflow.integrations.onnx_export import export_onnx, parity_pixels
    from freezeflow.integrations.serving import ONNX_FILE, save_serving_model

    prepared, folder = load_prepared(Path(spec["prepared_dir"])), Path(spec["folder"])
    model = build_backbone(spec["backbone"], spec["weights"], num_classes=len(prepared.classes)).eval()
    mean, std = normalization(spec["backbone"])
    info = ModelInfo(spec["backbone"], list(prepared.classes), spec["image_size"], tuple(mean), tuple(std))
    bundle = save_bundle(model, info, folder / "bundle")
    pixels = parity_pixels(prepared)
    parity = export_onnx(model, info, pixels, bundle / ONNX_FILE, name=f"bench {spec['backbone']}")
    paths = {}
    for runtime in RUNTIMES:
        path = folder / f"pyfunc-{runtime}"
        save_serving_model(path, bundle, ServeParams(runtime=runtime), pixels[0], folder / f"code-{runtime}")
        paths[runtime] = str(path)
    return {"paths": paths | {"bundle": str(bundle)}, "parity": parity}


def list_contenders(ctx: harness.Context, models: dict[str, str], requests: list[Path]) -> list[dict]:
    base = harness.make_spec(ctx, "", "serve", "head")
    common = {"requests": [str(p) for p in requests], "bundle": models["bundle"],
              "image_size": ctx.settings.image_size, "backbone": ctx.settings.backbone}
    specs = []
    for batch in BATCHES:
        specs.append(base | common | {"name": f"plain-eager-b{batch}", "runner": "bench.serve:run_plain_loop",
                                      "batch": batch})
    for runtime in RUNTIMES:
        for batch in BATCHES:
            specs.append(base | common | {"name": f"pyfunc-{runtime}-b{batch}", "runner": "bench.serve:run_pyfunc",
                                          "batch": batch, "model": models[runtime], "runtime": runtime})
    return specs


# ---- contenders (in the worker) ---------------------------------------------------------------------------

def read_requests(spec: dict) -> list[bytes]:
    return [Path(p).read_bytes() for p in spec["requests"]]


def time_batches(batches: list, run) -> dict:
    """Run the first batch once to warm up, then every batch, timed; images/s over the timed pass."""
    run(batches[0])
    start = time.perf_counter()
    done = sum(run(batch) for batch in batches)
    wall = time.perf_counter() - start
    return {"images": done, "wall_s": wall, "images_per_s": done / wall}


def split(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_plain_loop(spec: dict) -> dict:
    """The hand-written loop: PIL decode, torchvision transforms, torch.stack, the eager model, softmax."""
    import torch

    from freezeflow.core.models.io import load_bundle

    model, _ = load_bundle(Path(spec["bundle"]))
    transform = harness.build_plain_transform(spec["image_size"], spec["backbone"], augment=False)

    @torch.inference_mode()
    def run(batch: list[bytes]) -> int:
        x = torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for data in batch])
        probabilities = torch.softmax(model(x), dim=1)
        return int(probabilities.argmax(1).numel())

    return time_batches(split(read_requests(spec), spec["batch"]), run)


def run_pyfunc(spec: dict) -> dict:
    """The served model as MLflow loads it, on DataFrames of base64 strings (encoded before the clock)."""
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(spec["model"])
    frames = [pd.DataFrame({"image": [base64.b64encode(data).decode("ascii") for data in batch]})
              for batch in split(read_requests(spec), spec["batch"])]

    def run(frame: pd.DataFrame) -> int:
        rows = model.predict(frame)
        if rows["error"].notna().any():
            raise RuntimeError(f"a bench request failed: {rows['error'].dropna().iloc[0]}")
        return len(rows)

    return time_batches(frames, run) | {"runtime": model.unwrap_python_model().config["runtime"]}


# ---- the report ---------------------------------------------------------------------------------------------

def summarize(spec: dict, runs: list[dict]) -> dict:
    return {"name": spec["name"], "batch": spec["batch"], "repeats": len(runs), "images": runs[0]["images"],
            "images_per_s": harness.summarize_values([r["images_per_s"] for r in runs], 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "torch_threads": runs[0]["torch_threads"]}


def compare(rows: dict[str, dict]) -> list[dict]:
    out = []
    for batch in BATCHES:
        plain = rows[f"plain-eager-b{batch}"]["images_per_s"]["median"]
        out.append({"batch": batch, "plain_eager": plain,
                    **{f"pyfunc_{r}": rows[f"pyfunc-{r}-b{batch}"]["images_per_s"]["median"] for r in RUNTIMES},
                    **{f"ratio_{r}": round(rows[f"pyfunc-{r}-b{batch}"]["images_per_s"]["median"] / plain, 2)
                       for r in RUNTIMES}})
    return out


def check_targets(comparisons: list[dict]) -> list[dict]:
    row = next(c for c in comparisons if c["batch"] == TARGET_BATCH)
    return [{"name": f"onnxruntime pyfunc vs plain eager loop, batch {TARGET_BATCH}",
             "criterion": f"images/s(pyfunc-onnx-b{TARGET_BATCH}) / images/s(plain-eager-b{TARGET_BATCH}) >= "
                          f"{TARGET_RATIO}", "value": row["ratio_onnx"], "met": row["ratio_onnx"] >= TARGET_RATIO}]


def run(ctx: harness.Context, pool) -> dict:
    folder = ctx.work / "serve"
    requests = write_requests(ctx, folder / "requests", TINY_IMAGES if ctx.settings.tiny else IMAGES)
    built = build_models(ctx, pool, folder)
    models, parity = built["paths"], built["parity"]
    contenders = list_contenders(ctx, models, requests)
    results = harness.run_alternating(pool, contenders, "serve")
    rows = {c["name"]: summarize(c, results[c["name"]]) for c in contenders}
    comparisons = compare(rows)
    sizes = sorted({Image.open(p).size for p in requests})
    return {"contenders": list(rows.values()), "comparisons": comparisons, "targets": check_targets(comparisons),
            "onnx_parity_max_abs_diff": parity,
            "requests": {"images": len(requests), "format": f"JPEG quality {JPEG_QUALITY}",
                         "sizes": [list(s) for s in sizes[:5]],
                         "mean_bytes": round(float(np.mean([p.stat().st_size for p in requests])), 1)}}


def render(report: dict) -> list[str]:
    rows = [[c["name"], c["batch"], c["repeats"], c["images"], harness.format_span(c["images_per_s"]),
             c["peak_rss_mb"]] for c in report["contenders"]]
    out = harness.render_table(["contender", "batch", "repeats", "images", "images/s median [min–max]",
                                "peak RSS MB"], rows)
    ratios = [[c["batch"], c["plain_eager"], c["pyfunc_torch"], c["pyfunc_onnx"], c["ratio_torch"], c["ratio_onnx"]]
              for c in report["comparisons"]]
    out += [""] + harness.render_table(["batch", "plain eager img/s", "pyfunc torch img/s", "pyfunc onnx img/s",
                                        "torch / plain", "onnx / plain"], ratios)
    req = report["requests"]
    return out + ["", f"Requests: {req['images']} images, {req['format']}, sizes {req['sizes']}, "
                      f"{req['mean_bytes']} bytes on average; ONNX parity (max abs diff of probabilities vs PyTorch "
                      f"on val images): {report['onnx_parity_max_abs_diff']:.2e}."]
