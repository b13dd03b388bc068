"""The contextual CRF head (Lin, Shen, van den Hengel and Reid, CVPR 2016) on segflow's FCN.

A CRF whose nodes are the cells of the FCN's coarse map (the decoder's output grid,
stride 8 for FCN-8s: 45x60 nodes for a 480x360 image). Its potentials:

- unary: the FCN's fused logits at each node (the FCN is the unary piece, already
  trained by its own cross-entropy, which is that piece's likelihood);
- pairwise, two relation types, each a small network on the features of the two nodes
  that outputs a K x K table of scores theta(y_i, y_j):
  - "surrounding": every pair of nodes within a (2R+1) x (2R+1) range box. Symmetric: the
    network sees (e_i + e_j, |e_i - e_j|) and its table is symmetrised, so
    theta_ij(u, v) = theta_ji(v, u) = theta_ij(v, u);
  - "above/below": every pair whose lower node is 1..R rows below the upper and at most R
    columns aside. Asymmetric: the network sees (e_upper, e_lower) in that order and the
    table's rows are the upper node's label ("sky above road" differs from "road above
    sky").
  e is a learned 1x1 projection of the backbone features at the node grid and coarser
  (s8, s16 and s32, resized to the grid).

Training is piecewise (Lin et al.'s piecewise likelihood): each pair's table is trained
as its own softmax over the K*K label pairs, P(u, v) = exp theta(u, v) / sum exp theta,
with the ground-truth pair of labels at the two nodes as the target. No inference runs
in backprop, so a step costs one pass of the pairwise nets.

Prediction runs `iterations` mean-field updates on the coarse graph,

    Q_i(u) ~ exp(U_i(u) + sum_r mean_{j in N_r(i)} sum_v theta_r,ij(u, v) Q_j(v)),

and returns U + messages of the last update as logits at the node grid; the engine
upsamples them bilinearly (and may follow with the dense CRF), as Lin et al. upsample and
refine their coarse prediction.

Defaults: R = 4 (a 9x9-node box, 72x72 px around each node at stride 8: 40 surrounding
and 36 above/below pair tables per node), 3 mean-field iterations. Cost per 480x360
image on this project's idle 2-core CPU (bench/structured_card.py, CamVid val): 0.67
CPU-seconds with the FCN-8s (0.13 alone); a piecewise training epoch (367 images, 256x352
crops) ~100 s on 2 threads.

What differs from the paper, and why: Lin et al. train the unary and pairwise networks
(and a multi-scale FeatMap-Net) together, piecewise, from the image; here the unary is
the trained FCN and its backbone is frozen, so only the pairwise pieces learn (cheap on a
CPU, and the head is saved alone against its base). Each relation's messages are
averaged over the node's neighbours in that relation rather than summed: independently
trained pieces each carry the label prior, and summing 40 of them would drown the unary.
The messages are also weighted against the unary (`pairwise_weight`): independently trained
pieces are each a whole classifier of the pair, so at full weight they outvote the FCN. The
first trained head (2 epochs on the bundled v1, full weight) lost 7 mIoU to that. Lin et al.
avoid it by training the unary and pairwise pieces together. Chosen on every 4th CamVid val
image (26) for the bundled head (4 piecewise epochs on v2; the FCN alone scores 62.01 on
those): the log-likelihood tables at weight 0.2 (63.39; 63.38 at 0.25, 62.95 at 0.1, 62.24 at
0.5, 58.32 at 1.0). Their pointwise mutual information (`potentials="pmi"`,
`pointwise_mutual_information`), which removes what a table says about each label's own
frequency, was tried as the fix first and scored below the FCN at every weight tried
(62.02 at 0.25, 61.37 at 1.0): the frequencies the tables carry are part of what helps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segflow.models.heads.base import Head, HeadInputs

STRIDES = {"s8": 8, "s16": 16, "s32": 32}


@dataclass(frozen=True)
class ContextConfig:
    """range_box: R, the box half-side in nodes; iterations: mean-field updates at prediction;
    embed: node feature size; hidden: pairwise network hidden units."""

    range_box: int = 4
    iterations: int = 3
    embed: int = 32
    hidden: int = 32
    potentials: str = "likelihood"  # "likelihood": the trained log-likelihood table as is; "pmi": less its labels' marginals
    pairwise_weight: float = 0.2  # weight of the messages against the unary (chosen on val: see below)

    def __post_init__(self):
        if self.range_box < 1 or self.iterations < 1 or self.embed < 1 or self.hidden < 1:
            raise ValueError(f"context CRF settings must be >= 1, got {self}")
        if self.potentials not in ("pmi", "likelihood") or self.pairwise_weight < 0:
            raise ValueError(f"context CRF potentials must be pmi or likelihood and pairwise_weight >= 0, got {self}")


class ContextCRFHead(Head):
    """A CRF on the coarse node grid with CNN pairwise potentials, trained piecewise."""

    name = "context"
    needs = ("features", "logits")
    training_mode = "piecewise"
    config_type = ContextConfig

    def __init__(self, num_classes: int, channels: dict[str, int], base_stride: int, config: ContextConfig | None = None):
        super().__init__(num_classes, channels, base_stride, config or ContextConfig())
        cfg = self.config
        self.sources = [name for name, s in STRIDES.items() if s >= base_stride]
        self.embed = nn.Sequential(nn.Conv2d(sum(channels[s] for s in self.sources), cfg.embed, 1), nn.ReLU(inplace=True))
        self.surrounding = SymmetricPairwise(cfg.embed, cfg.hidden, num_classes)
        self.above_below = OrderedPairwise(cfg.embed, cfg.hidden, num_classes)
        r = cfg.range_box
        self.surrounding_offsets = [(dy, dx) for dy in range(0, r + 1) for dx in range(-r, r + 1) if dy > 0 or dx > 0]
        self.above_below_offsets = [(dy, dx) for dy in range(1, r + 1) for dx in range(-r, r + 1)]

    def node_features(self, inputs: HeadInputs) -> torch.Tensor:
        """(N, embed, h, w) node features e on the logits' grid."""
        size = inputs.logits.shape[-2:]
        maps = [F.interpolate(inputs.features[s], size=size, mode="bilinear", align_corners=False) if inputs.features[s].shape[-2:] != size else inputs.features[s] for s in self.sources]
        return self.embed(torch.cat(maps, dim=1))

    def pair_tables(self, e: torch.Tensor) -> list[tuple[str, list[tuple[int, int]], torch.Tensor, torch.Tensor]]:
        """Per relation: (name, offsets, theta (N, h, w, O, K, K), valid (O, 1, h, w)).

        theta[..., o, :, :] at node i is the table of the pair (i, i + offsets[o]), its rows
        node i's label; `valid` says whether i + offset is on the grid (where it is not,
        theta is meaningless and every user masks it). All of a relation's pairs go through
        its network as one batch (one matrix product per layer), not one offset at a time.
        """
        node = e.permute(0, 2, 3, 1)[:, :, :, None, :]  # (N, h, w, 1, embed)
        tables = []
        for relation, net, offsets in (("surrounding", self.surrounding, self.surrounding_offsets), ("above_below", self.above_below, self.above_below_offsets)):
            valid = torch.stack([shift(torch.ones_like(e[:1, :1]), dy, dx)[0] for dy, dx in offsets])  # (O, 1, h, w)
            partner = torch.stack([shift(e, dy, dx) for dy, dx in offsets], dim=1).permute(0, 3, 4, 1, 2)  # (N, h, w, O, embed)
            tables.append((relation, offsets, net(node.expand_as(partner), partner), valid))
        return tables

    def forward(self, inputs: HeadInputs) -> torch.Tensor:
        """Mean-field on the node grid -> (N, K, h, w) logits at the decoder's stride.

        Off-grid partners need no mask: their Q is shifted in as zero, and what a node
        sends to them is shifted out of the grid.
        """
        unary = inputs.logits
        relations = []
        for relation, offsets, theta, valid in self.pair_tables(self.node_features(inputs)):
            if self.config.potentials == "pmi":
                theta = pointwise_mutual_information(theta)
            theta = theta * self.config.pairwise_weight
            # Neighbours of each node in this relation: as a pair's first node, and as its partner.
            count = (valid.sum(0) + sum(shift(v, -dy, -dx) for v, (dy, dx) in zip(valid, offsets))).clamp(min=1)
            # Two layouts, made once and used by every update, so that both products below
            # reduce over contiguous trailing dimensions: (u, [o, v]) for a node's own message
            # and ([o, v], u) for what it sends, which is theta itself when theta is symmetric.
            rows = theta.permute(0, 1, 2, 4, 3, 5).flatten(-2).contiguous()  # (N, h, w, K_u, O*K_v)
            cols = theta if relation == "surrounding" else theta.transpose(-1, -2).contiguous()  # (N, h, w, O, K_v, K_u)
            relations.append((offsets, rows, cols, count))
        logits = unary
        for _ in range(self.config.iterations):
            q = logits.softmax(dim=1)
            q_node = q.permute(0, 2, 3, 1)[:, :, :, None, None, :]  # (N, h, w, 1, 1, K_u)
            messages = torch.zeros_like(unary)
            for offsets, rows, cols, count in relations:
                q_partner = torch.stack([shift(q, dy, dx) for dy, dx in offsets], dim=3).permute(0, 2, 4, 3, 1).flatten(-2)  # (N, h, w, O*K_v)
                # einsum, not multiply-and-sum: on a CPU it is ~14x faster for these shapes
                # (2.2 against 31.7 ms for one product at 480x360, one thread), and it never
                # materialises the N x h x w x K x O*K product.
                to_node = torch.einsum("nhwuj,nhwj->nhwu", rows, q_partner).permute(0, 3, 1, 2)  # sum_o,v theta_o(u, v) Q_{i+o}(v)
                sent = torch.einsum("nhwovu,nhwu->nhwov", cols, q_node[:, :, :, 0, 0, :]).permute(3, 0, 4, 1, 2)  # (O, N, K_v, h, w): sum_u theta_o(u, v) Q_i(u)
                for m, (dy, dx) in zip(sent, offsets):
                    add_shifted(to_node, m, -dy, -dx)  # what node i sends, delivered at i + offset
                messages = messages + to_node / count
            logits = unary + messages
        return logits

    def loss(self, inputs: HeadInputs, targets: torch.Tensor, weight, ignore_index: int) -> dict[str, torch.Tensor]:
        """Piecewise likelihood of the pairwise pieces: cross-entropy over the K*K label pairs of each edge.

        Node labels are the targets sampled (nearest) at the node grid; an edge counts when
        both its nodes are on the grid and labelled. `weight` (per-class) is not used: a
        pair's weight would be a product of two, which over-weights rare-rare pairs.
        """
        k = self.num_classes
        h, w = inputs.logits.shape[-2:]
        labels = F.interpolate(targets[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        known = (labels != ignore_index) & (labels >= 0) & (labels < k)
        labels = labels.where(known, torch.zeros_like(labels))
        losses = {}
        for relation, offsets, theta, valid in self.pair_tables(self.node_features(inputs)):
            partner = torch.stack([shift(labels, dy, dx) for dy, dx in offsets], dim=-1)  # (N, h, w, O)
            partner_known = torch.stack([shift(known, dy, dx) for dy, dx in offsets], dim=-1)
            use = known[..., None] & partner_known & valid[:, 0].permute(1, 2, 0).bool()
            pair = labels[..., None] * k + partner
            nll = F.cross_entropy(theta.reshape(-1, k * k), pair.reshape(-1), reduction="none").view_as(pair)
            losses[relation] = (nll * use).sum() / use.sum().clamp(min=1)
        return losses


def pointwise_mutual_information(theta: torch.Tensor) -> torch.Tensor:
    """log P(u, v) - log P(u) - log P(v) of a (..., K, K) table of pair scores, P = softmax over the K*K pairs.

    A piecewise-trained table is a log-likelihood of label pairs, so it also says how common
    each label is; as a potential it pulls every node towards the frequent classes (road,
    sky), which the unary already knows, and rare classes lose. Its PMI keeps what the pair
    says beyond the two labels' own frequencies (sky above road: more than chance), is 0 for
    independent labels, and stays symmetric when the table is.
    """
    joint = theta.flatten(-2).log_softmax(-1).view_as(theta)  # log P(u, v)
    p = joint.exp()  # one exponential of the table, not one per marginal
    return joint - p.sum(-1, keepdim=True).log() - p.sum(-2, keepdim=True).log()


class SymmetricPairwise(nn.Module):
    """theta(e_i, e_j) for (..., embed) node features -> (..., K, K), unchanged when the nodes
    swap, and a symmetric table: theta_ij(u, v) = theta_ji(u, v) = theta_ij(v, u)."""

    def __init__(self, embed: int, hidden: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.hidden = nn.Linear(2 * embed, hidden)
        # One output per unordered label pair, read into both (u, v) and (v, u): half the
        # work of a full table and symmetric by construction.
        self.table = nn.Linear(hidden, num_classes * (num_classes + 1) // 2)
        upper = torch.triu_indices(num_classes, num_classes)
        index = torch.zeros(num_classes, num_classes, dtype=torch.long)
        index[upper[0], upper[1]] = torch.arange(upper.shape[1])
        index[upper[1], upper[0]] = torch.arange(upper.shape[1])
        self.register_buffer("pair_index", index.flatten(), persistent=False)

    def forward(self, e_i: torch.Tensor, e_j: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.hidden(torch.cat([e_i + e_j, (e_i - e_j).abs()], dim=-1)))
        return self.table(h)[..., self.pair_index].unflatten(-1, (self.num_classes, self.num_classes))


class OrderedPairwise(nn.Module):
    """theta(e_upper, e_lower) for (..., embed) node features -> (..., K, K); rows are the upper node's label."""

    def __init__(self, embed: int, hidden: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.hidden = nn.Linear(2 * embed, hidden)
        self.table = nn.Linear(hidden, num_classes * num_classes)

    def forward(self, e_upper: torch.Tensor, e_lower: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.hidden(torch.cat([e_upper, e_lower], dim=-1)))
        return self.table(h).unflatten(-1, (self.num_classes, self.num_classes))


def shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y, x] = t[..., y + dy, x + dx], zero where that falls off the grid."""
    out = t.new_zeros(t.shape)
    h, w = t.shape[-2:]
    if abs(dy) < h and abs(dx) < w:
        out[..., _dst(dy, h), _dst(dx, w)] = t[..., _src(dy, h), _src(dx, w)]
    return out


def add_shifted(acc: torch.Tensor, t: torch.Tensor, dy: int, dx: int) -> None:
    """acc[..., y, x] += t[..., y + dy, x + dx] where (y + dy, x + dx) is on the grid, in place.

    Slicing, not F.pad: padding allocates and fills a new tensor per offset, which was
    most of the head's time with ~80 offsets per relation.
    """
    h, w = t.shape[-2:]
    if abs(dy) < h and abs(dx) < w:
        acc[..., _dst(dy, h), _dst(dx, w)] += t[..., _src(dy, h), _src(dx, w)]


def _dst(d: int, size: int) -> slice:
    return slice(max(-d, 0), size - max(d, 0))


def _src(d: int, size: int) -> slice:
    return slice(max(d, 0), size - max(-d, 0))
