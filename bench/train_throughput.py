"""Stage 04 training throughput: samples/s and the share of each step spent waiting for data.

python bench/train_throughput.py [--config configs/lumbar/demo.yaml] [--batches 30] [key=value ...]

Needs the stage-03 crops of the config (`make demo`). Each contender trains the same rows for the same
number of batches in one run (after a few warm-up batches); the device is the config's (GPU if any).
"""

import argparse
import itertools
import time

import torch

from spine.core.config import load_config
from spine.core.paths import Paths
from spine.core.train.dist import device_for_rank
from spine.core.train.loop import TrainSettings, autocast
from spine.core.train.stage import make_loader
from spine.lumbar.classify import CropDataset, RowLoss, build_model, train_rows

CONTENDERS = {
    "2.5D resnet10t, slices as channels": ["train.model=cnn25d", "train.backbone=resnet10t"],
    "2.5D resnet10t, slice sequence + GRU": [
        "train.model=cnn25d",
        "train.backbone=resnet10t",
        "train.slice_mode=sequence",
    ],
    "3D ResNet, width 16": ["train.model=cnn3d", "train.width_3d=16"],
}


def measure(cfg, batches: int, warmup: int = 3) -> dict:
    paths = Paths.from_config(cfg)
    device = device_for_rank(cfg.train.device)
    rows = train_rows(paths)
    rows = rows[rows["grade"] >= 0]
    loader = make_loader(CropDataset(paths, rows, cfg.train.views, augment=True), cfg.train, True, device)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn, s = RowLoss(cfg.train.aux_binary), TrainSettings(epochs=1, lr=1e-3, amp=cfg.train.amp)
    stream = itertools.cycle(loader)  # loader workers stay up for the whole measurement
    samples, wait, start = 0, 0.0, None
    for i in range(warmup + batches):
        if i == warmup:
            samples, wait, start = 0, 0.0, time.perf_counter()
        tick = time.perf_counter()
        batch = next(stream)
        wait += time.perf_counter() - tick
        with autocast(device, s.amp):
            loss = loss_fn(model, batch, device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples += len(batch["y"])
    seconds = time.perf_counter() - start
    return {"samples_per_s": samples / seconds, "data_wait_share": wait / seconds, "device": str(device)}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/lumbar/demo.yaml")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", default="0,2", help="loader worker counts to compare")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    print("| model | loader workers | samples/s | data wait share | device |\n|---|---|---|---|---|")
    for name, over in CONTENDERS.items():
        for w in (int(x) for x in args.workers.split(",")):
            cfg = load_config(args.config, [*over, f"train.loader_workers={w}", *args.overrides])
            r = measure(cfg, args.batches)
            print(f"| {name} | {w} | {r['samples_per_s']:.0f} | {r['data_wait_share']:.1%} | {r['device']} |")


if __name__ == "__main__":
    main()
