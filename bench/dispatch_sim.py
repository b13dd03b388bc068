"""Simulate the executor's shard dispatch: how close to the ideal finish time does a job end?

Runs in a second, with no Ray and no model: the shards are `sharding.shard_sizes`' cut, each
image costs `--seconds-per-image` (+- `--jitter`, uniform) on its actor, every actor starts
at once, and the driver opens shards exactly as `engine.next_actor` chooses, at most
`--in-flight-per-actor` per actor (the executor's default cap is 2). Printed per actor count
and image count: the ideal finish time (images x cost / actors) over the simulated one,
averaged over `--seeds` seeds, for the engine's dispatch and for the earlier one (fewest
open shards, no hold at the end). What it leaves out: actor start, the driver's round trips
and commits, and two processes slowing each other; `bench/run.py` measures those.

    python bench/dispatch_sim.py
    python bench/dispatch_sim.py --actors 2 --images 200 --seeds 100
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segflow.pipeline.engine import next_actor  # noqa: E402
from segflow.pipeline.sharding import shard_sizes  # noqa: E402


def fewest_open(load: list[int], usable: list[int], waiting: int) -> int | None:
    """The dispatch before the hold at the end: always the actor with the fewest open shards."""
    return min(usable, key=load.__getitem__) if usable else None


def simulate(images: int, actors: int, choose, seed: int, shard_size: int = 64, cost: float = 0.35,
             jitter: float = 0.15, per_actor: int = 2) -> float:
    """Ideal over simulated finish time of one job."""
    rng = random.Random(seed)
    waiting = list(shard_sizes(images, shard_size))
    busy_until = [0.0] * actors  # when each actor finishes what it holds
    open_shards: list[tuple[float, int]] = []  # (finish time, actor)
    now = 0.0
    while waiting or open_shards:
        while waiting and len(open_shards) < per_actor * actors:
            load = [sum(1 for _, a in open_shards if a == i) for i in range(actors)]
            actor = choose(load, list(range(actors)), len(waiting))
            if actor is None:
                break
            size = waiting.pop(0)
            begin = max(busy_until[actor], now)
            busy_until[actor] = begin + sum(cost * (1 + rng.uniform(-jitter, jitter)) for _ in range(size))
            open_shards.append((busy_until[actor], actor))
        open_shards.sort()
        now, _ = open_shards.pop(0)  # the next commit
    return images * cost / actors / now


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--actors", default="2,4,8", help="comma-separated actor counts")
    p.add_argument("--images", default="40,100,200,300,468,1000,2000", help="comma-separated image counts")
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--seconds-per-image", type=float, default=0.35)
    p.add_argument("--jitter", type=float, default=0.15)
    p.add_argument("--in-flight-per-actor", type=int, default=2)
    args = p.parse_args()
    print("actors images  engine  fewest-open  (ideal / simulated finish time)")
    for actors in (int(a) for a in args.actors.split(",")):
        for images in (int(n) for n in args.images.split(",")):
            scores = []
            for choose in (next_actor, fewest_open):
                runs = [
                    simulate(images, actors, choose, seed, args.shard_size, args.seconds_per_image, args.jitter, args.in_flight_per_actor)
                    for seed in range(args.seeds)
                ]
                scores.append(sum(runs) / len(runs))
            print(f"{actors:6d} {images:6d}  {scores[0]:.3f}   {scores[1]:.3f}")


if __name__ == "__main__":
    main()
