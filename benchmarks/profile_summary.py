"""Where the time goes, from a py-spy profile of the engine (see docs/benchmarks.md).

    py-spy record --subprocesses --format raw -r 50 -o w2.txt -- python benchmarks/speed.py --engine-only --workloads W2
    python benchmarks/profile_summary.py w2.txt

py-spy's raw format is one line per distinct stack, `frame;frame;...;frame COUNT`. This prints the
functions with the most samples of their own (self) and the share of samples spent inside each
part of the engine (inclusive), as the table in docs/benchmarks.md reports them.
"""

from __future__ import annotations

import argparse
import collections
import re

# (label, substring of a frame "function (file:line)") for the inclusive shares
PARTS = [
    ("nn.Linear forward", "Linear.forward (torch/nn/modules/linear.py"),
    ("autograd backward", "_engine_run_backward"),
    ("attention (packed, per bucket)", "PackedEncoder.attention ("),
    ("dropout masks", "dropout (hierfedlora/fast/packed.py|draw (hierfedlora/fast/masks.py"),
    ("GELU", "GELUActivation.forward"),
    ("layer norm", "layer_norm (torch/nn/functional.py"),
    ("frozen prefix (first sight of an example)", "FrozenPrefix._compute ("),
    ("  of which before a job's first step (FastModel.prepare)", "FastModel.prepare"),
    ("evaluation", "batch_scores (hierfedlora/device/train.py"),
    ("device jobs (local_train: prepare and steps)", "local_train (hierfedlora/device/train.py|local_train_joined (hierfedlora/fast/joined.py"),
    ("set-up (model, data)", "Simulation.__init__"),
    ("packing, collation, cache lookups", "make_pack|collate (hierfedlora/data.py|PrefixCache"),
]


def summarise(path: str, top: int = 10) -> None:
    own: collections.Counter[str] = collections.Counter()
    stacks: list[tuple[list[str], int]] = []
    total = 0
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        stacks.append((frames, int(n)))
        own[frames[-1]] += int(n)
        total += int(n)
    print(f"{total} samples")
    print("most own time:")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame[:110]}")
    print("inside each part (a sample counts once per part it is in):")
    for label, pattern in PARTS:
        keys = pattern.split("|")
        n = sum(c for frames, c in stacks if any(k in f for f in frames for k in keys))
        print(f"  {100 * n / total:5.1f}%  {label}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="py-spy output in --format raw")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    summarise(args.profile, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
