"""`segflow train`: train an FCN, or a head on a trained FCN, on an image folder and a label folder."""

from __future__ import annotations

import json
import shlex
import sys


def add_parser(sub) -> None:
    from segflow.models.heads import DEFAULT_HEAD, HEADS

    p = sub.add_parser("train", help="train an FCN, or a head on a trained FCN, on image/label folders (CamVid layout)")
    p.add_argument("--images", required=True, help="folder of training images (required)")
    p.add_argument("--labels", required=True, help="folder of class-index label PNGs with the images' file stems (required)")
    p.add_argument("--val-images", required=True, help="folder of validation images, scored every --eval-every epochs (required)")
    p.add_argument("--val-labels", required=True, help="folder of validation label PNGs (required)")
    p.add_argument("--output", required=True, help="where the best checkpoint (safetensors) is written; head-only for dpn/context (required)")
    p.add_argument("--work-dir", required=True, help="folder for the resumable per-epoch state (state.pt) and history.json (required)")
    p.add_argument("--model", default="fcn8s_resnet18", help="network: fcn8s|fcn16s|fcn32s _ resnet18|resnet34|resnet50|mobilenet_v3_large (default: fcn8s_resnet18)")
    p.add_argument("--head", choices=tuple(HEADS), default=DEFAULT_HEAD,
                   help=f"head on the FCN (default: {DEFAULT_HEAD}): fcn trains the whole network jointly; dpn (Deep Parsing "
                        "Network MRF layers) trains staged on a frozen base and context (contextual CRF) piecewise on a frozen "
                        "base, both saved head-only; crfrnn (FCN + trainable mean-field CRF) trains jointly, saved complete")
    p.add_argument("--base", help="checkpoint to start from: 'bundled', a path or URL, or 'none' for from scratch "
                                  "(default: bundled for dpn, context and crfrnn; none for fcn, which trains from scratch)")
    p.add_argument("--label-set", default="camvid", help="class names and palette of the labels (default: camvid)")
    p.add_argument("--epochs", type=int, default=200, help="passes over the training images (default: 200)")
    p.add_argument("--batch-size", type=int, default=8, help="augmented crops per step (default: 8)")
    p.add_argument("--lr", type=float, help="AdamW peak learning rate, decayed polynomially (power 0.9) to 0 (default: 0.002; "
                                             "0.0001 when a whole trained base is fine-tuned, as crfrnn does)")
    p.add_argument("--crop", type=int, nargs=2, default=(176, 224), metavar=("H", "W"), help="training crop size in pixels (default: 176 224)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.5, 0.9), metavar=("MIN", "MAX"), help="random rescale range before cropping (default: 0.5 0.9)")
    p.add_argument("--class-weights", choices=("median-frequency", "none"), default="median-frequency",
                   help="per-class loss weights (default: median-frequency, SegNet's balancing)")
    p.add_argument("--eval-every", type=int, default=5, help="score val mIoU every N epochs and keep the best checkpoint (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, augmentation and batch order (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, torch's own choice)")
    p.add_argument("--max-images", type=int, default=0, help="use only the first N training and N val images, for smoke runs (default: 0, all)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay per step of an exponential moving average of the weights, which val scores and the checkpoint "
                        "holds, such as 0.998 (default: 0, off)")
    p.add_argument("--device", default="cpu",
                   help="where training runs: cpu, cuda, cuda:N, or auto for the GPU when torch sees one (default: cpu); "
                        "the recipe and seed are the same on each")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/state.pt (default: start afresh)")
    p.set_defaults(run=run)


def run(args) -> int:
    from segflow.models.train import TrainConfig, train

    cfg = TrainConfig(
        images=args.images, labels=args.labels, val_images=args.val_images, val_labels=args.val_labels,
        output=args.output, work_dir=args.work_dir, model=args.model, head=args.head, base=args.base, label_set=args.label_set,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, crop=tuple(args.crop), scale=tuple(args.scale),
        class_weights=args.class_weights, eval_every=args.eval_every, seed=args.seed, threads=args.threads,
        max_images=args.max_images, resume=args.resume, ema=args.ema, device=args.device, command="segflow " + shlex.join(sys.argv[1:]),
    )
    best = train(cfg)
    print(json.dumps({"best_val_miou": best["miou"], "epoch": best.get("epoch")}))
    return 0
