"""The zoo's one optimizer (metanet.zoo.optim.RowOptimizer) on both parameter layouts the engines
use: per-parameter tensors ``{key: [M, *shape]}`` (vmap engine) and one flat buffer ``[M, D]``
(batched engine, C kernels), against torch.optim per network."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from metanet.zoo.optim import RowOptimizer, optimizer_hparams, optimizer_order, uses_adam
from metanet.zoo.recipe import NetworkPlan

SHAPES = {"w": (4, 3), "b": (4,), "conv": (2, 3, 3, 3), "scale": ()}  # a scalar too
DIM = sum(torch.Size(s).numel() for s in SHAPES.values())


def _pack(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].reshape(d[k].shape[0], -1) for k in SHAPES], dim=1)


def _unpack(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, o = {}, 0
    for k, s in SHAPES.items():
        size = torch.Size(s).numel()
        out[k] = flat[:, o : o + size].reshape(flat.shape[0], *s).clone()
        o += size
    return out


class Layouts:
    """One RowOptimizer per layout over the same rows, stepped with the same gradients."""

    def __init__(self, init: torch.Tensor, lr, wd, mom, k_sgd: int) -> None:
        self.flat = init.clone()
        self.dict = _unpack(init)
        self.opt_flat = RowOptimizer(self.flat, lr, wd, mom, k_sgd)
        self.opt_dict = RowOptimizer(self.dict, lr, wd, mom, k_sgd)

    def step(self, grad: torch.Tensor, frozen: torch.Tensor | None = None) -> None:
        self.opt_flat.step(self.flat, grad.clone(), frozen)
        self.opt_dict.step(self.dict, _unpack(grad), frozen)
        assert torch.equal(_pack(self.dict), self.flat)  # the two layouts: the same numbers

    def reset(self, rows: list[int], init: torch.Tensor, lr, wd, mom) -> None:
        r = torch.tensor(rows)
        self.flat[r] = init
        for k, v in _unpack(init).items():
            self.dict[k][r] = v
        for opt in (self.opt_flat, self.opt_dict):
            opt.reset(r, lr, wd, mom)

    def select(self, keep: torch.Tensor) -> None:
        self.flat = self.flat[keep]
        self.dict = {k: v[keep] for k, v in self.dict.items()}
        self.opt_flat.select(keep)
        self.opt_dict.select(keep)


def _reference(kind: str, lr: float, wd: float, mom: float, init: torch.Tensor):
    """One network of ``DIM`` parameters trained by torch.optim."""
    p = torch.nn.Parameter(init.clone())
    if kind == "sgd":
        return p, torch.optim.SGD([p], lr=lr, momentum=mom, weight_decay=wd)
    return p, torch.optim.AdamW([p], lr=lr, weight_decay=wd)


def _ref_step(ref, grad: torch.Tensor) -> None:
    p, opt = ref
    p.grad = grad.clone()
    opt.step()


# every kind the recipes can ask for: plain SGD, SGD with momentum and weight decay, Adam
# (AdamW without decay), AdamW with decay; SGD rows first
KINDS = [("sgd", 0.1, 0.0, 0.0), ("sgd", 0.05, 0.01, 0.9), ("adam", 0.01, 0.0, 0.9),
         ("adam", 0.003, 0.05, 0.0)]  # fmt: skip


@pytest.mark.parametrize("kinds", [KINDS, KINDS[:2], KINDS[2:]], ids=["mixed", "sgd", "adam"])
def test_both_layouts_give_the_updates_of_torch_optim(kinds):
    """Per-network dicts and flat rows get bit-identical updates over several steps, equal to
    torch.optim's SGD / AdamW for each network, for every optimizer kind."""
    gen = torch.Generator().manual_seed(0)
    m = len(kinds)
    init = torch.randn(m, DIM, generator=gen)
    lr, wd, mom = (torch.tensor([k[j] for k in kinds]) for j in (1, 2, 3))
    k_sgd = sum(k[0] == "sgd" for k in kinds)
    lay = Layouts(init, lr, wd, mom, k_sgd)
    refs = [_reference(k[0], k[1], k[2], k[3], init[i]) for i, k in enumerate(kinds)]
    for _ in range(7):
        grad = torch.randn(m, DIM, generator=gen)
        lay.step(grad)
        for i, ref in enumerate(refs):
            _ref_step(ref, grad[i])
    for i, (p, _) in enumerate(refs):
        torch.testing.assert_close(lay.flat[i], p.detach(), atol=1e-6, rtol=1e-5)
        assert not torch.equal(lay.flat[i], init[i])


def test_lanes_with_different_step_counts_frozen_rows_and_leaving_rows():
    """Rows as lanes: a lane's next network starts from fresh optimizer state (reset) while the
    other rows go on, a frozen row keeps its weights (even with NaN gradients), rows leave the
    batch (select); both layouts agree bit for bit and every network equals torch.optim
    trained alone for its own number of steps."""
    gen = torch.Generator().manual_seed(1)
    # rows 0-1 SGD, rows 2-3 AdamW; networks: a (row 0, 3 steps) then e (row 0, 5 steps),
    # b (row 1, 8 steps), c (row 2, 2 steps) then f (row 2, 6 steps), d (row 3, frozen at 4)
    hp = {"a": ("sgd", 0.1, 0.01, 0.9), "b": ("sgd", 0.05, 0.0, 0.5),
          "c": ("adam", 0.01, 0.05, 0.0), "d": ("adam", 0.02, 0.0, 0.0),
          "e": ("sgd", 0.02, 0.1, 0.0), "f": ("adam", 0.005, 0.01, 0.0)}  # fmt: skip
    inits = {k: torch.randn(DIM, generator=gen) for k in hp}
    refs = {k: _reference(*hp[k], inits[k]) for k in hp}

    def cols(names):
        return [torch.tensor([hp[n][j] for n in names]) for j in (1, 2, 3)]

    rows = ["a", "b", "c", "d"]
    lay = Layouts(torch.stack([inits[n] for n in rows]), *cols(rows), k_sgd=2)
    frozen_at, held = {"d": 4}, {}
    for t in range(8):
        if t == 3:  # lane 0: a is done, e starts
            rows[0] = "e"
            lay.reset([0], inits["e"][None], *cols(["e"]))
        if t == 2:  # lane 2: c is done, f starts
            rows[2] = "f"
            lay.reset([2], inits["f"][None], *cols(["f"]))
        if t == 6:  # d's lane leaves the batch
            keep = torch.tensor([n != "d" for n in rows])
            lay.select(keep)
            rows = [n for n in rows if n != "d"]
        grad = torch.randn(len(rows), DIM, generator=gen)
        frozen = torch.tensor([t >= frozen_at.get(n, 99) for n in rows])
        if frozen.any():
            grad[frozen] = float("nan")
            held = {n: lay.flat[i].clone() for i, n in enumerate(rows) if frozen[i]}
        lay.step(grad, frozen)
        for i, n in enumerate(rows):
            if frozen[i]:
                assert torch.equal(lay.flat[i], held[n])
            else:
                _ref_step(refs[n], grad[i])
        if t == 2:
            final_a = lay.flat[0].clone()
        if t == 1:
            final_c = lay.flat[2].clone()
    assert lay.opt_flat.steps.tolist() == [6.0] == lay.opt_dict.steps.tolist()  # f's 6 steps
    done = {"a": final_a, "c": final_c, **{n: lay.flat[i] for i, n in enumerate(rows)}}
    for n in ("a", "b", "c", "e", "f"):
        torch.testing.assert_close(done[n], refs[n][0].detach(), atol=1e-6, rtol=1e-5)
    # d: frozen after 4 steps, its NaN gradients never reached its weights
    torch.testing.assert_close(held["d"], refs["d"][0].detach(), atol=1e-6, rtol=1e-5)


def test_plans_give_rows_sgd_first_with_the_zoo_defaults():
    plans = [NetworkPlan(i, 0, i, hp) for i, hp in enumerate(
        [{"optimizer": "adam", "lr": 0.1}, {"optimizer": "sgd", "momentum": 0.5}, {},
         {"optimizer": "sgd", "weight_decay": 0.01}])]  # fmt: skip
    is_adam = uses_adam(plans)
    assert is_adam == [True, False, True, False]
    assert optimizer_order(is_adam) == [1, 3, 0, 2]
    lr, wd, mom = optimizer_hparams(plans)
    assert lr.tolist() == pytest.approx([0.1, 0.01, 0.01, 0.01])
    assert wd.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.01])
    assert mom.tolist() == pytest.approx([0.9, 0.5, 0.9, 0.9])
    with pytest.raises(ValueError, match="k_sgd=5"):
        RowOptimizer(torch.zeros(4, 3), lr, wd, mom, k_sgd=5)


def test_engines_share_one_module_without_an_import_cycle():
    """The batched engine and the C-kernel driver take the schedule, the random draws and the
    optimizer from metanet.zoo.schedule / metanet.zoo.optim, not from the vmap engine's module;
    the vmap engine's module still offers the shared names."""
    code = ("import sys, metanet.zoo.batched, metanet.zoo.native; "
            "print('metanet.zoo.train' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    from metanet.zoo import batched, schedule, train

    for name in ("dropout_keys", "dropout_multipliers", "sample_orders", "step_schedule",
                 "init_rows", "init_network", "assemble_records", "ChunkData"):  # fmt: skip
        assert getattr(train, name) is getattr(schedule, name)
    assert batched.plan_lanes is schedule.plan_lanes
