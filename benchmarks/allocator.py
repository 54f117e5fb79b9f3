"""The malloc setting of the processes that run torch on batches of images (transfer_learning/common/allocator.py),
measured in one run on two workloads of MobileNetV2 at batch 32 of 224x224 images:

    train:   a training step as `finetune.unfreeze: 2` trains (the frozen prefix under no_grad, the last two blocks
             and a new head trained with SGD)
    forward: a forward pass of the whole network in inference mode, as the advisor measures similarity

each side in fresh processes, --reps processes per side taken in turn:

    glibc defaults  vs  keep_freed_memory() called first, as finetune/run.py's train() and stages/advise.py do

Per process: the median seconds of --steps steps after 2 warm-up steps, the CPU seconds (user, system) those steps
took, and the peak resident memory. Printed: each side's medians and spread over the processes, and the ratios.
Self-contained (random weights and images, no project files):
    python benchmarks/allocator.py [--reps 5] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Timing, ratio_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = """
import json, resource, statistics, sys, time
import torch
from torchvision.models import mobilenet_v2
if sys.argv[1] == "kept":
    from transfer_learning.common.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.manual_seed(0)
net = mobilenet_v2(weights=None, num_classes=10)
frozen, trained = net.features[:-2], torch.nn.Sequential(net.features[-2:], torch.nn.AdaptiveAvgPool2d(1),
                                                          torch.nn.Flatten(), net.classifier)
frozen.eval().requires_grad_(False)
optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3, momentum=0.9)
images, labels = torch.randn(32, 3, 224, 224), torch.randint(0, 10, (32,))

def train_step():
    with torch.no_grad():
        middle = frozen(images)
    loss = torch.nn.functional.cross_entropy(trained(middle), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def forward_step():
    with torch.inference_mode():
        net.eval()(images).softmax(1)


step = train_step if sys.argv[3] == "train" else forward_step

for _ in range(2):
    step()
before, seconds = resource.getrusage(resource.RUSAGE_SELF), []
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - started)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"step": statistics.median(seconds), "user": after.ru_utime - before.ru_utime,
                  "system": after.ru_stime - before.ru_stime, "peak_mb": after.ru_maxrss / 1024}))
"""


def one_process(side: str, steps: int, workload: str) -> dict:
    done = subprocess.run([sys.executable, "-c", STEPS, side, str(steps), workload], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def compare(workload: str, reps: int, steps: int) -> None:
    sides = ("defaults", "kept")
    found: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(reps):
        for side in sides:
            found[side].append(one_process(side, steps, workload))
    timed = {side: Timing(tuple(run["step"] for run in runs)) for side, runs in found.items()}
    median = {side: {key: statistics.median(run[key] for run in runs) for key in ("user", "system", "peak_mb")}
              for side, runs in found.items()}
    for side in sides:
        print(f"{workload} {side:8s}: step {timed[side]}; CPU over {steps} steps: user {median[side]['user']:.1f} s, "
              f"system {median[side]['system']:.1f} s (medians); peak RSS {median[side]['peak_mb']:.0f} MB (median)")
    print(ratio_line(f"{workload} step time, defaults / kept", timed["defaults"].median / timed["kept"].median,
                     timed["kept"], timed["defaults"]))
    print(f"{workload} peak RSS, kept / defaults: {median['kept']['peak_mb'] / median['defaults']['peak_mb']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.reps < 5:
        parser.error("--reps: at least 5")
    for workload in ("train", "forward"):
        compare(workload, args.reps, args.steps)


if __name__ == "__main__":
    main()
