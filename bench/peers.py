"""bench peers: freezeflow against fastai and PyTorch Lightning on the same task.

    python -m bench peers --repeats 3 --epochs 10 --image-size 64 --threads 1

Each peer runs the way its documentation teaches, on the same files, split, image size, epochs, seed,
batch size and lr as freezeflow; the pretrained body comes from `build_backbone`, so every contender starts
from the same weights. Pairs (peer <-> freezeflow strategy):

  fastai-freeze-one-cycle   vision_learner, freeze(), fit_one_cycle(E)           <-> head
  fastai-fine-tune          vision_learner, fine_tune(E - 1, freeze_epochs=1)    <-> gradual
  lightning-frozen          LightningModule, backbone in eval under no_grad       <-> head
  lightning-backbone-ft     LightningModule + BackboneFinetuning(unfreeze at 1)  <-> gradual

fastai's fine_tune and Lightning's BackboneFinetuning both train the head alone for one epoch, then the whole
body at a lower lr: freezeflow's `gradual` (head for head_epochs=1, then stages thaw from the top at
lr * lr_decay ** depth) is the same idea, ULMFiT's. freezeflow `none` runs too, as a cross-check that costs
freezeflow more work than the peers (every stage trains from epoch 1).

fastai and lightning come from the optional group `bench` (pip install -e '.[bench]'); they are imported only
inside the contender functions, so this module imports without them.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets

from bench import harness
from freezeflow.core.models.registry import build_backbone, normalization
from freezeflow.core.errors import UserError
from freezeflow.core.params import Params

BACKBONES = ("efficientnet_lite0", "resnet18")  # besides --backbone, when their weights load
FREEZEFLOW = {"freezeflow-head": "head", "freezeflow-gradual": "gradual", "freezeflow-none": "none"}
# name: (runner, peer's own strategy name, mode passed to the runner)
PEERS = {"fastai-freeze-one-cycle": ("run_fastai", "freeze + fit_one_cycle", "one_cycle"),
         "fastai-fine-tune": ("run_fastai", "fine_tune", "fine_tune"),
         "lightning-frozen": ("run_lightning", "frozen feature extractor", "frozen"),
         "lightning-backbone-ft": ("run_lightning", "BackboneFinetuning", "backbone_finetuning")}
PAIRS = (("fastai-freeze-one-cycle", "freezeflow-head"), ("fastai-fine-tune", "freezeflow-gradual"),
         ("lightning-frozen", "freezeflow-head"), ("lightning-backbone-ft", "freezeflow-gradual"))
CROSS_CHECKS = (("fastai-fine-tune", "freezeflow-none"), ("lightning-backbone-ft", "freezeflow-none"))
# --slow-repeats applies to every contender but these (seconds per run, not minutes)
FAST = ("freezeflow-head", "lightning-frozen")
CROSS_CHECK_REPEATS = 1  # freezeflow-none only feeds the cross-check: one run keeps the suite near 30 min on 2 cores
VAL_TOLERANCE = 0.01  # absolute: freezeflow's val accuracy may be at most this much below the peer's
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}  # plus FASTAI_HOME in the scratch folder, per run


def check_ready(settings) -> str | None:
    missing = [name for name in ("fastai", "lightning") if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs {' and '.join(missing)}: pip install -e '.[bench]'"
    return None


# ---- suite ------------------------------------------------------------------------------------------

def run(ctx: harness.Context, pool) -> dict:
    """Every contender of every usable backbone alternately; one comparison and one target per pair."""
    contenders, skipped = [], []
    for backbone in list_backbones(ctx.settings):
        reason = check_weights(ctx.settings, backbone)
        if reason:
            skipped.append({"backbone": backbone, "weights": ctx.settings.weights, "reason": reason})
            continue
        contenders += make_specs(ctx, backbone)
    results = harness.run_alternating(pool, contenders, "peers")
    rows = {c["name"]: summarize_row(c, results[c["name"]]) for c in contenders}
    backbones = sorted({c["backbone"] for c in contenders}, key=list_backbones(ctx.settings).index)
    comparisons = [compare_pair(rows, peer, ff, b) for b in backbones for peer, ff in PAIRS]
    cross = [compare_pair(rows, peer, ff, b) for b in backbones for peer, ff in CROSS_CHECKS]
    notes = harness.list_notes(ctx, "peers") + list_peer_notes(ctx, contenders)
    return {"notes": notes, "contenders": list(rows.values()), "skipped": skipped, "comparisons": comparisons,
            "cross_checks": cross, "targets": [check_target(c) for c in comparisons],
            "peer_versions": read_peer_versions(), "recipes": describe_peers(ctx)}


def list_peer_notes(ctx: harness.Context, contenders: list[dict]) -> list[str]:
    notes = [f"{c['name']} ran {c['repeats']} time(s)" + (" (cross-check only)" if c["contender"] == "freezeflow-none"
             else " (--slow-repeats)") + f", --repeats is {ctx.settings.repeats}"
             for c in contenders if c["repeats"] < ctx.settings.repeats]
    if ctx.settings.epochs < 2:
        notes.append("fastai-fine-tune ran 2 epochs: fine_tune needs at least one frozen and one unfrozen epoch")
    return notes


def list_backbones(settings) -> list[str]:
    """--backbone first; --tiny measures that one only (seconds matter more than coverage there)."""
    if settings.tiny:
        return [settings.backbone]
    return [settings.backbone] + [b for b in BACKBONES if b != settings.backbone]


def check_weights(settings, backbone: str) -> str | None:
    """None when `backbone` loads its --weights here (no download), else why not."""
    try:
        build_backbone(backbone, settings.weights, num_classes=2)
    except UserError as exc:
        return str(exc)
    return None


def make_specs(ctx: harness.Context, backbone: str) -> list[dict]:
    sub = replace(ctx, settings=replace(ctx.settings, backbone=backbone))  # make_spec reads the backbone here
    specs = [harness.make_spec(sub, f"{name}-{backbone}", "freezeflow", strategy, pick_repeats(ctx.settings, name))
             | {"contender": name} for name, strategy in FREEZEFLOW.items()]
    for name, (runner, strategy, mode) in PEERS.items():
        spec = harness.make_spec(sub, f"{name}-{backbone}", name, "head", pick_repeats(ctx.settings, name))
        specs.append(spec | {"contender": name, "strategy": strategy, "mode": mode,
                             "runner": f"bench.peers:{runner}"})
    return [s | {"backbone": backbone} for s in specs]


def pick_repeats(settings, name: str) -> int | None:
    """None (= --repeats) for fast contenders; --slow-repeats for slow ones; 1 for the cross-check only."""
    repeats = settings.slow_repeats if settings.slow_repeats and name not in FAST else settings.repeats
    cross_only = {ff for _, ff in CROSS_CHECKS} - {ff for _, ff in PAIRS}
    if name in cross_only:
        repeats = min(repeats, CROSS_CHECK_REPEATS)
    return None if repeats == settings.repeats else repeats


def summarize_row(spec: dict, runs: list[dict]) -> dict:
    row = harness.summarize_training(spec, runs)
    extra = {"contender": spec["contender"], "backbone": spec["backbone"],
             "epochs_run": runs[0].get("epochs_run", len(runs[0]["epoch_time_s"])),
             "torch_threads": runs[0]["torch_threads"]}
    if "import_s" in runs[0]:
        extra["import_s"] = harness.summarize_values([r["import_s"] for r in runs])
        extra["num_workers"] = runs[0]["num_workers"]
    return row | extra


def compare_pair(rows: dict, peer: str, ff: str, backbone: str) -> dict:
    p, f = rows[f"{peer}-{backbone}"], rows[f"{ff}-{backbone}"]
    return {"backbone": backbone, "peer": peer, "freezeflow": ff,
            "peer_wall_s": p["wall_s"]["median"], "freezeflow_wall_s": f["wall_s"]["median"],
            "speedup_wall": round(p["wall_s"]["median"] / f["wall_s"]["median"], 2),
            "speedup_train_time": round(p["train_time_s"]["median"] / f["train_time_s"]["median"], 2),
            "peer_val_accuracy": p["val_accuracy"], "freezeflow_val_accuracy": f["val_accuracy"],
            "peer_test_accuracy": p["test_accuracy"], "freezeflow_test_accuracy": f["test_accuracy"]}


def check_target(c: dict) -> dict:
    faster = c["freezeflow_wall_s"] < c["peer_wall_s"]
    accurate = c["freezeflow_val_accuracy"] >= c["peer_val_accuracy"] - VAL_TOLERANCE
    return {"name": f"{c['freezeflow']} vs {c['peer']} ({c['backbone']})",
            "criterion": f"freezeflow wall < peer wall, val accuracy >= peer's - {VAL_TOLERANCE}",
            "value": c["speedup_wall"], "val_accuracy_gap": round(c["freezeflow_val_accuracy"]
                                                                  - c["peer_val_accuracy"], 4),
            "met": bool(faster and accurate)}


def read_peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("fastai", "fastcore", "lightning"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def describe_peers(ctx: harness.Context) -> dict:
    s = ctx.settings
    return {"fastai-freeze-one-cycle": f"vision_learner(dls, body, cut, pretrained=True): fastai's head "
                                       f"(concat pool, BN, dropout, Linear 512, Linear); freeze(); "
                                       f"fit_one_cycle({s.epochs}, lr_max=lr, wd)",
            "fastai-fine-tune": f"the same learner; fine_tune({max(s.epochs - 1, 1)}, base_lr=lr, freeze_epochs=1, "
                                "wd): 1 frozen epoch, then all layers with slice(lr/200, lr/2)",
            "fastai-data": "DataBlock(ImageBlock, CategoryBlock, get_y=parent_label, IndexSplitter(val), "
                           "item_tfms=Resize(S), batch_tfms=Normalize(backbone's mean/std)) over the manifest's "
                           "train + val files; test: dls.test_dl(test files, with_labels=True); fastai's default "
                           "num_workers; frozen BatchNorm trains (train_bn=True, fastai's default)",
            "lightning-frozen": "LightningModule(backbone = the body, head = freezeflow's head); forward runs the "
                                "backbone in eval under no_grad (the Lightning docs' transfer-learning example); "
                                "AdamW(head, lr, wd) + CosineAnnealingLR(E)",
            "lightning-backbone-ft": "the same module, backbone trainable in forward; BackboneFinetuning("
                                     "unfreeze_backbone_at_epoch=1), its defaults otherwise (backbone lr = 0.1 x "
                                     "current lr, x1.5 per epoch, train_bn=True); AdamW(requires_grad params) + "
                                     "CosineAnnealingLR(E)",
            "lightning-data": "ImageFolder + PIL Resize/CenterCrop/ToTensor/Normalize, split by the manifest "
                              "(harness.build_plain_subsets), DataLoader(batch, shuffle=True, num_workers=0)",
            "scoring": "val accuracy every epoch; the best-val weights are scored on test (as freezeflow and "
                       "the recipes suite); wall_s excludes importing fastai / lightning (import_s)"}


# ---- shared worker helpers ----------------------------------------------------------------------------

def stay_offline(work: str) -> None:
    """No downloads or telemetry from the peers; their caches go to the bench's scratch folder."""
    os.environ.update(OFFLINE_ENV | {"FASTAI_HOME": str(Path(work) / "fastai-home")})
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def read_split_files(params: Params, prepared_root: Path) -> dict[str, list[Path]]:
    """freezeflow's manifest split as image paths, through harness.map_split (the recipes suite's mapping)."""
    folder = datasets.ImageFolder(params.data.dir)
    split, _ = harness.map_split(folder, prepared_root)
    return {name: [Path(folder.samples[i][0]) for i in rows] for name, rows in split.items()}


def build_body(params: Params, num_classes: int) -> tuple[nn.Sequential, nn.Module]:
    """The pretrained body (every stage but the head) and freezeflow's head, seeded like freezeflow."""
    torch.manual_seed(params.train.seed)
    model = build_backbone(params.train.backbone, params.train.weights, num_classes=num_classes)
    return nn.Sequential(*model.stages[:-1]), model.stages[-1]


def finish_run(start: float, import_s: float, tracker, test_accuracy: float, workers: int) -> dict:
    return {"wall_s": time.perf_counter() - start, "train_time_s": sum(tracker.epoch_times),
            "epoch_time_s": list(tracker.epoch_times), "val_accuracy": tracker.best_val,
            "test_accuracy": test_accuracy, "best_epoch": tracker.best_epoch,
            "epochs_run": len(tracker.epoch_times), "import_s": import_s, "num_workers": workers}


class BestTracker:
    """Train-phase time per epoch and the best-val weights in memory (what bench's plain recipe keeps)."""

    def __init__(self):
        self.epoch_times: list[float] = []
        self.started = self.last_batch = 0.0
        self.best_val, self.best_epoch, self.best_state = -1.0, 0, None

    def start_epoch(self) -> None:
        self.started = self.last_batch = time.perf_counter()

    def end_batch(self) -> None:
        self.last_batch = time.perf_counter()

    def end_epoch(self, val_accuracy: float, model: nn.Module) -> None:
        self.epoch_times.append(self.last_batch - self.started)
        if val_accuracy > self.best_val:
            self.best_val, self.best_epoch = val_accuracy, len(self.epoch_times)
            self.best_state = copy.deepcopy(model.state_dict())


# ---- contender: fastai -------------------------------------------------------------------------------

def run_fastai(spec: dict) -> dict:
    """fastai's documented path: DataBlock from the files, vision_learner, then fit_one_cycle or fine_tune."""
    stay_offline(spec["work"])
    start = time.perf_counter()
    from fastai.vision import all as fv
    import_s = time.perf_counter() - start
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])  # in case an import changed it
    params: Params = spec["params"]
    start = time.perf_counter()
    files = read_split_files(params, Path(spec["prepared_root"]))
    dls = build_fastai_loaders(fv, files, params)
    tracker = BestTracker()
    defaults = spec.get("peer_defaults", False)  # fastai's own lr and weight decay (bench quality)
    learn = build_fastai_learner(fv, dls, params, tracker, Path(spec["work"]), spec.get("train_bn", True),
                                 None if defaults else params.train.weight_decay)
    epochs, lr, wd = params.train.epochs, params.train.lr, params.train.weight_decay
    with learn.no_bar(), learn.no_logging():
        if spec["mode"] == "one_cycle":
            learn.freeze()
            learn.fit_one_cycle(epochs, lr, wd=wd)
        elif defaults:  # fine_tune's documented defaults: base_lr=2e-3, the learner's wd, 1 frozen epoch
            learn.fine_tune(max(epochs - 1, 1), freeze_epochs=1)
        else:  # one frozen epoch + E-1 unfrozen = E epochs (fastai's own default adds freeze_epochs to E)
            learn.fine_tune(max(epochs - 1, 1), base_lr=lr, freeze_epochs=1, wd=wd)
        learn.model.load_state_dict(tracker.best_state)
        preds, targets = learn.get_preds(dl=dls.test_dl(files["test"], with_labels=True))
    test = float((preds.argmax(1) == targets).float().mean())
    return finish_run(start, import_s, tracker, test, dls.train.num_workers)


def build_fastai_loaders(fv, files: dict[str, list[Path]], params: Params):
    n_train, n_val = len(files["train"]), len(files["val"])
    mean, std = normalization(params.train.backbone)
    block = fv.DataBlock(blocks=(fv.ImageBlock, fv.CategoryBlock), get_y=fv.parent_label,
                         splitter=fv.IndexSplitter(list(range(n_train, n_train + n_val))),
                         item_tfms=fv.Resize(params.data.image_size),
                         batch_tfms=fv.Normalize.from_stats(list(mean), list(std)))
    fv.set_seed(params.train.seed)
    return block.dataloaders(files["train"] + files["val"], bs=params.train.batch_size, device=harness.pick_device())


def build_fastai_learner(fv, dls, params: Params, tracker: BestTracker, work: Path, train_bn: bool = True,
                         wd: float | None = None):
    """vision_learner over the pretrained body (cut after it); fastai adds its own head, as for any arch."""
    body, _ = build_body(params, dls.c)

    def arch(pretrained: bool = True, **_):  # fastai calls arch(pretrained=...) for archs it does not know
        return body

    class KeepBest(fv.Callback):
        order = fv.Recorder.order + 1  # after the Recorder has the epoch's metrics

        def before_train(self):
            tracker.start_epoch()

        def after_train(self):
            tracker.end_batch()
            self.trained = True

        def after_epoch(self):  # get_preds and validate fire after_epoch too: count only epochs that trained
            if getattr(self, "trained", False):
                tracker.end_epoch(float(self.recorder.values[-1][-1]), self.model)
                self.trained = False

    # vision_learner drops its `cut` argument (fastai 2.8.12): model_meta is how fastai learns a new arch's cut
    fv.model_meta[arch] = {"cut": len(body), "split": fv.default_split}
    learn = fv.vision_learner(dls, arch, pretrained=True, metrics=fv.accuracy, cbs=[KeepBest()], path=work,
                              wd=wd, train_bn=train_bn)  # wd None: fastai's default; train_bn: for diagnostics
    if torch.cuda.is_available():
        learn = learn.to_fp16()  # what a fastai user does on a GPU; freezeflow's amp is "auto"
    return learn


# ---- contender: PyTorch Lightning ---------------------------------------------------------------------

def run_lightning(spec: dict) -> dict:
    """A LightningModule over the same body and head; frozen, or BackboneFinetuning from epoch head_epochs."""
    stay_offline(spec["work"])
    start = time.perf_counter()
    import lightning as L
    from lightning.pytorch.callbacks import BackboneFinetuning
    import_s = time.perf_counter() - start
    params: Params = spec["params"]
    start = time.perf_counter()
    subsets = harness.build_plain_subsets(params, Path(spec["prepared_root"]))
    bs = params.train.batch_size
    loaders = {"train": DataLoader(subsets["train"], batch_size=bs, shuffle=True),
               "val": DataLoader(subsets["val"], batch_size=bs), "test": DataLoader(subsets["test"], batch_size=bs)}
    L.seed_everything(params.train.seed, verbose=False)
    tracker = BestTracker()
    frozen = spec["mode"] == "frozen"
    module = build_lightning_module(L, params, len(subsets["train"].dataset.classes), frozen, tracker,
                                    spec.get("peer_defaults", False))
    callbacks = [] if frozen else [BackboneFinetuning(unfreeze_backbone_at_epoch=params.train.freeze.head_epochs)]
    trainer = L.Trainer(max_epochs=params.train.epochs, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, default_root_dir=spec["work"],
                        precision="16-mixed" if torch.cuda.is_available() else "32-true")
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])  # in case Lightning changed it
    trainer.fit(module, loaders["train"], loaders["val"])
    module.load_state_dict(tracker.best_state)
    device = harness.pick_device()
    test = harness.evaluate_plain(module.to(device), loaders["test"], device)
    return finish_run(start, import_s, tracker, test, 0)


def build_lightning_module(L, params: Params, num_classes: int, frozen: bool, tracker: BestTracker,
                           defaults: bool = False):
    """defaults: the optimizer of BackboneFinetuning's documented example, Adam(lr=1e-3), no scheduler."""
    body, head = build_body(params, num_classes)
    tp = params.train

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = body, head  # BackboneFinetuning freezes `.backbone`
            self.correct = self.seen = 0
            if frozen:
                self.backbone.requires_grad_(False)

        def forward(self, x):
            if frozen:  # the Lightning docs' feature extractor: eval mode, no graph
                self.backbone.eval()
                with torch.no_grad():
                    features = self.backbone(x)
                return self.head(features)
            return self.head(self.backbone(x))

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def on_train_epoch_start(self):
            tracker.start_epoch()

        def on_train_batch_end(self, *_):
            tracker.end_batch()

        def validation_step(self, batch, _):
            x, y = batch
            self.correct += int((self(x).argmax(1) == y).sum())
            self.seen += len(y)

        def on_validation_epoch_end(self):
            if not self.trainer.sanity_checking:
                tracker.end_epoch(self.correct / self.seen, self)
            self.correct = self.seen = 0

        def configure_optimizers(self):
            trainable = [p for p in self.parameters() if p.requires_grad]
            if defaults:
                return torch.optim.Adam(trainable, lr=1e-3)
            optimizer = torch.optim.AdamW(trainable, lr=tp.lr, weight_decay=tp.weight_decay)
            return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tp.epochs)]

    return Classifier()


# ---- output -------------------------------------------------------------------------------------------

def render(report: dict) -> list[str]:
    rows = [[c["name"], c["strategy"], c["repeats"], c["epochs_run"], harness.format_span(c["wall_s"]),
             harness.format_span(c["train_time_s"]), c["epoch_time_s_median"], c["val_accuracy"], c["test_accuracy"],
             c["peak_rss_mb"], harness.format_span(c["import_s"]) if "import_s" in c else "-"]
            for c in report["contenders"]]
    out = harness.render_table(["contender", "strategy", "repeats", "epochs", "wall s median [min–max]",
                              "train-loop s", "epoch s (median)", "val acc", "test acc", "peak RSS MB",
                              "import s (not in wall)"], rows)
    header = ["backbone", "peer", "freezeflow", "peer wall s", "freezeflow wall s", "speedup (wall)",
              "speedup (train loop)", "peer val", "freezeflow val", "peer test", "freezeflow test"]
    for title, key in (("Pairs", "comparisons"), ("Cross-check against freezeflow none (no target)", "cross_checks")):
        pairs = [[c["backbone"], c["peer"], c["freezeflow"], c["peer_wall_s"], c["freezeflow_wall_s"],
                  c["speedup_wall"], c["speedup_train_time"], c["peer_val_accuracy"], c["freezeflow_val_accuracy"],
                  c["peer_test_accuracy"], c["freezeflow_test_accuracy"]] for c in report[key]]
        out += ["", f"{title}:", ""] + harness.render_table(header, pairs)
    versions = ", ".join(f"{k} {v}" for k, v in report["peer_versions"].items())
    out += ["", f"Peers: {versions}."]
    out += [f"Skipped {s['backbone']} (weights {s['weights']}): {s['reason']}" for s in report["skipped"]]
    return out
