"""`segflow train`: train an FCN on an image folder and a label folder."""

from __future__ import annotations

import json
import shlex
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an FCN from scratch on image/label folders (CamVid layout)")
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--labels", required=True, help="folder of class-index label PNGs, same file stems")
    p.add_argument("--val-images", required=True)
    p.add_argument("--val-labels", required=True)
    p.add_argument("--output", required=True, help="where the best checkpoint (safetensors) is written")
    p.add_argument("--work-dir", required=True, help="resumable state and history")
    p.add_argument("--model", default="fcn8s_resnet18", help="fcn8s|fcn16s|fcn32s _ resnet18|resnet34|resnet50|mobilenet_v3_large")
    p.add_argument("--label-set", default="camvid")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--crop", type=int, nargs=2, default=(176, 224), metavar=("H", "W"))
    p.add_argument("--scale", type=float, nargs=2, default=(0.5, 0.9), metavar=("MIN", "MAX"))
    p.add_argument("--class-weights", choices=("median-frequency", "none"), default="median-frequency")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/state.pt")
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.models.train import TrainConfig, train

    cfg = TrainConfig(
        images=args.images, labels=args.labels, val_images=args.val_images, val_labels=args.val_labels,
        output=args.output, work_dir=args.work_dir, model=args.model, label_set=args.label_set,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, crop=tuple(args.crop), scale=tuple(args.scale),
        class_weights=args.class_weights, eval_every=args.eval_every, seed=args.seed, threads=args.threads,
        resume=args.resume, command="segflow " + shlex.join(sys.argv[1:]),
    )
    best = train(cfg)
    print(json.dumps({"best_val_miou": best["miou"], "epoch": best.get("epoch")}))
    return 0
