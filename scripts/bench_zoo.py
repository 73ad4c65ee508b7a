"""Zoo building speed: networks per minute, vmap chunk training vs a plain per-network loop.

Both train the same networks of a recipe (first ``--nets`` run ids; the same sampled lr, weight
decay, optimizer, dropout, init, train subset, label noise, batch size and epochs) and evaluate
them on the digits test split once at the end. The plain loop is the usual one-model-at-a-time
code with ``torch.optim`` (SGD with momentum / AdamW) on a DataLoader-free index shuffle; it
trains the first ``--plain-nets`` of those networks (a rate is a rate; the networks are i.i.d.
draws from the recipe). Prints a table; nothing is written.

    python scripts/bench_zoo.py [--recipe datasets/digits-cnn.yaml] [--nets 50] [--plain-nets 10]
                                [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from metanet.zoo.architectures import SampledDropout
from metanet.zoo.build import make_chunks
from metanet.zoo.recipe import NetworkPlan, Recipe
from metanet.zoo.train import TaskData, cached_digits, classifier_data, init_network, train_chunk


def plain_train(arch: dict, plan: NetworkPlan, data: TaskData, i: int, flat: bool) -> float:
    """Train network ``i`` of ``data`` alone with torch.optim; return its test accuracy."""
    hp = plan.hparams
    model = init_network(arch, plan.seed, hp["init"], hp["init_scale"])
    for m in model.modules():
        if isinstance(m, SampledDropout):
            m.p.fill_(hp["dropout"])
    if hp["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])  # fmt: skip
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    idx = data.subset[i].nonzero().squeeze(1)
    x, y = data.x_train[idx], data.y_train[i][idx]
    bs = int(hp["batch_size"])
    model.train()
    for _ in range(int(hp["epochs"])):
        perm = torch.randperm(len(idx))
        for s in range(0, len(idx), bs):
            b = perm[s : s + bs]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(data.x_eval["test"])
    return float((out.argmax(1) == data.y_eval["test"]).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="datasets/digits-cnn.yaml")
    parser.add_argument("--nets", type=int, default=50, help="networks trained by vmap")
    parser.add_argument("--plain-nets", type=int, default=10, help="networks trained one by one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe.load(args.recipe)
    if recipe.kind != "classifier":
        raise SystemExit("bench_zoo compares classifier recipes")
    plans = recipe.plan(args.nets)
    arch = recipe.architectures[0]
    plans = [p for p in plans if p.arch_index == 0]
    flat = arch["type"] == "mlp"
    cached_digits(recipe.data["split_seed"], recipe.data["test_fraction"])

    # warm-up (imports, first vmap trace) on 2 networks, not timed
    warm = plans[:2]
    train_chunk(arch, warm, classifier_data(warm, flat), [1.0])

    t0 = time.perf_counter()
    chunks = [c for c in make_chunks(recipe, plans) if c.arch_index == 0]
    accs = []
    for c in chunks:
        data = classifier_data(list(c.plans), flat)
        res = train_chunk(arch, list(c.plans), data, recipe.keep_fractions)
        accs += res.metrics["test_acc"][res.metrics["final"] == 1].tolist()
    t_vmap = time.perf_counter() - t0

    sub = plans[: args.plain_nets]
    t0 = time.perf_counter()
    data = classifier_data(sub, flat)
    plain_acc = [plain_train(arch, p, data, i, flat) for i, p in enumerate(sub)]
    t_plain = time.perf_counter() - t0

    rate_v = 60 * len(plans) / t_vmap
    rate_p = 60 * len(sub) / t_plain
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cli = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python scripts/bench_zoo.py {cli}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"torch={torch.__version__} threads={args.threads} load1={load:.1f}")  # fmt: skip
    print(f"recipe: {recipe.name} ({recipe.source}), arch {arch['type']}, "
          f"{len(chunks)} vmap chunk(s) of <= {recipe.chunk_size}")  # fmt: skip
    print()
    print("| method | networks | seconds | nets/minute | speed-up | mean final test acc |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| plain loop (torch.optim, one net at a time) | {len(sub)} | {t_plain:.1f} | "
          f"{rate_p:.1f} | 1.0x | {sum(plain_acc) / len(plain_acc):.3f} |")  # fmt: skip
    print(f"| metanet.zoo vmap (torch.func) | {len(plans)} | {t_vmap:.1f} | {rate_v:.1f} | "
          f"{rate_v / rate_p:.1f}x | {sum(accs) / len(accs):.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
