"""Weight generators: samplers, canonicalization, Lightning training, ``metanet generate``."""

from __future__ import annotations

import csv
import json
import math
import os

import lightning as L
import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from metanet.generate import (
    FlowMatching,
    GaussianDiffusion,
    GeneratorDataModule,
    ParamAutoencoder,
    ResidualMLP,
    TokenTransformer,
    canonicalize,
    make_betas,
    nearest_distances,
)
from metanet.generate.cli import main as generate_main
from metanet.generate.taskzoo import build_task_zoo
from metanet.tasks.flow_generation import FlowGenerationTask
from metanet.tasks.generation import GenerationError
from metanet.tasks.generators import load_generator
from metanet.tasks.latent_diffusion import LatentDiffusionTask
from metanet.weightspace import WeightSpace, WeightSpaceSpec, permute, random_permutation
from metanet.zoo.architectures import build_module

ARCH = {"type": "mlp", "in": 64, "widths": [8, 8], "out": 10, "activation": "relu"}


@pytest.fixture(scope="module")
def task_zoo(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("genzoo") / "tasks.h5"
    return build_task_zoo(path, arch=ARCH, per_task=4, steps=80, seed=0)


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


# -- building blocks -------------------------------------------------------------------------------
def test_backbone_and_autoencoder_shapes() -> None:
    x, t, c = torch.randn(3, 70), torch.rand(3), torch.tensor([0, 1, 2])
    for net in (ResidualMLP(70, 32, 2, num_conditions=2), TokenTransformer(70, 16, 32, 1, 4, 2)):
        out = net(x, t, c)
        assert out.shape == (3, 70)
    for mixer in ("transformer", "mlp"):
        ae = ParamAutoencoder(70, chunk=16, hidden=32, latent=4, depth=1, mixer=mixer)
        z = ae.encode(x)
        assert z.shape == (3, 5, 4) and ae.latent_shape == (5, 4)
        assert ae.decode(z).shape == (3, 70)
    with pytest.raises(ValueError, match=r"\[B, 70\]"):
        ae.encode(torch.randn(3, 71))


def test_noise_schedules() -> None:
    for kind in ("linear", "cosine"):
        betas = make_betas(100, kind)
        abar = torch.cumprod(1 - betas, 0)
        assert betas.shape == (100,) and (betas > 0).all() and (betas < 1).all()
        assert (abar[1:] < abar[:-1]).all() and abar[-1] < 0.05
    with pytest.raises(ValueError, match="schedule"):
        make_betas(10, "quadratic")


@pytest.mark.parametrize("which", ["flow", "ddpm", "ddim"])
def test_generators_fit_a_handful_of_points(which: str) -> None:
    """Trained on 3 points in 6-D, samples land near them (start: far away) and cover all 3."""
    data = torch.tensor([[2.0] * 6, [-2.0] * 6, [2.0, -2.0] * 3])
    net = ResidualMLP(6, 64, 2)
    proc = FlowMatching() if which == "flow" else GaussianDiffusion(100, "cosine")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    c = torch.zeros(48, dtype=torch.long)
    losses = []
    for _ in range(300):
        x = data[torch.randint(0, 3, (48,))]
        loss = proc.loss(net, x, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-50:]) < 0.7 * sum(losses[:50])  # flow matching has an irreducible floor
    net.eval()
    gen = torch.Generator().manual_seed(0)
    if which == "flow":
        out = proc.sample(net, (60, 6), c[:1].expand(60), steps=20, method="heun", generator=gen)
    else:
        out = proc.sample(
            net, (60, 6), c[:1].expand(60), steps=50, method=which, generator=gen, clip=3.0
        )
    dist, idx = nearest_distances(out, data)
    assert dist.median() < 0.35 * math.sqrt(6) * 2  # start: ~ |N(0,I) - point| ≈ 5.3
    assert dist.median() < 1.0
    assert set(idx.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("mixer", ["transformer", "mlp"])
def test_autoencoder_loss_decreases(mixer: str) -> None:
    data = torch.randn(4, 50)
    ae = ParamAutoencoder(
        50, chunk=10, hidden=32, latent=4, depth=1, latent_noise=0.01, mixer=mixer
    )
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    first = ae.loss(data).item()
    for _ in range(150):
        loss = ae.loss(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae.eval()
    assert float(ae.loss(data)) < 0.3 * first


# -- canonicalization ------------------------------------------------------------------------------
def test_canonicalize_undoes_random_permutations(task_zoo) -> None:
    from metanet.data.zoo_store import Zoo

    zoo = Zoo.open(task_zoo)
    group = zoo[zoo.architectures[0]]
    ref = group.weight_space([0])
    gen = torch.Generator().manual_seed(1)
    copies = WeightSpace.cat([permute(ref, random_permutation(ref.spec, gen)) for _ in range(4)])
    raw = (copies.flatten() - ref.flatten()).norm(dim=1)
    assert (raw > 1e-3).all()
    canon = canonicalize(copies, ref)
    assert (canon.flatten() - ref.flatten()).norm(dim=1).max() < 1e-5
    # and the functions never changed
    x = torch.rand(5, 64)
    m_a, m_b = build_module(ARCH), build_module(ARCH)
    for i in range(4):
        copies.load_into(m_a, i)
        canon.load_into(m_b, i)
        torch.testing.assert_close(m_a(x), m_b(x))
    # independently trained nets: aligning to a reference reduces their distances to it
    others = group.weight_space(list(range(1, len(group))))
    before = (others.flatten() - ref.flatten()).norm(dim=1)
    after = (canonicalize(others, ref).flatten() - ref.flatten()).norm(dim=1)
    assert (after <= before + 1e-5).all() and after.mean() < before.mean()


def test_nearest_distances_excludes_self_and_groups() -> None:
    pool = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.0, 1.0]])
    d, i = nearest_distances(pool, pool, exclude_self=True)
    assert i.tolist() == [1, 0, 3, 2]
    d, i = nearest_distances(pool, pool, exclude_self=True, groups=torch.tensor([0, 0, 1, 1]))
    assert i.tolist()[:2] == [2, 2] and d[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        nearest_distances(torch.zeros(2, 3), torch.zeros(2, 4))


# -- data module -----------------------------------------------------------------------------------
def test_datamodule_conditions_and_normalization(task_zoo) -> None:
    dm = GeneratorDataModule(task_zoo, condition="task", canonicalize=True)
    dm.setup("fit")
    assert dm.conditions == ["0-4", "5-9"]
    from metanet.data.zoo_store import Zoo

    with Zoo.open(task_zoo) as zoo:  # each record's label is its network's task
        tasks = zoo[zoo.architectures[0]].hparams["task"].tolist()
    assert sorted(tasks) == ["0-4"] * 4 + ["5-9"] * 4
    assert dm.labels.tolist() == [dm.conditions.index(t) for t in tasks]
    assert dm.task_classes == {"0-4": [0, 1, 2, 3, 4], "5-9": [5, 6, 7, 8, 9]}
    assert dm.vectors.shape == (8, dm.spec.num_params) == (8, dm.dim)
    torch.testing.assert_close(dm.vectors * dm.std + dm.mean, dm.raw_vectors)
    # the reference (best test_acc) is unchanged by canonicalization
    x, c = next(iter(dm.train_dataloader()))
    assert x.shape[1] == dm.dim and c.dtype == torch.long
    binned = GeneratorDataModule(task_zoo, condition="lr", bins=[0.007], canonicalize=False)
    binned.setup()
    assert binned.conditions == ["lr[-inf,0.007)", "lr[0.007,inf)"]
    with pytest.raises(ValueError, match="condition 'colour'"):
        GeneratorDataModule(task_zoo, condition="colour").setup()
    with pytest.raises(ValueError, match="give bins"):
        GeneratorDataModule(task_zoo, condition="lr").setup()
    with pytest.raises(ValueError, match="at least 2"):
        GeneratorDataModule(task_zoo, min_test_acc=1.01).setup()


# -- Lightning training + metanet generate ------------------------------------------------------
@pytest.fixture(scope="module")
def flow_ckpt(task_zoo, tmp_path_factory) -> str:
    torch.manual_seed(0)
    dm = GeneratorDataModule(task_zoo, condition="task", batch_size=4)
    task = FlowGenerationTask(hidden=32, depth=1, sample_steps=4)
    trainer = _trainer(6)
    trainer.fit(task, datamodule=dm)
    path = str(tmp_path_factory.mktemp("flowckpt") / "flow.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_flow_checkpoint_generates_loadable_networks(flow_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "gen"
    rc = generate_main(
        ["--generator", flow_ckpt, "--n", "4", "--condition", "5-9", "-o", str(out), "--seed", "1"]
    )
    assert rc == 0, capsys.readouterr().err
    files = sorted(f for f in os.listdir(out) if f.startswith("net_"))
    assert files == [f"net_{i:04d}.safetensors" for i in range(4)]
    arch = json.loads((out / "arch.json").read_text())
    x = torch.rand(7, 64)
    for f in files:
        module = build_module(arch)
        module.load_state_dict(load_safetensors(out / f), strict=True)
        y = module(x)
        assert y.shape == (7, 10) and torch.isfinite(y).all()
    rows = list(csv.DictReader(open(out / "generated.csv")))
    assert [r["file"] for r in rows] == files
    assert {r["condition"] for r in rows} == {"5-9"}
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        assert float(r["test_acc"]) == pytest.approx(float(r["acc_5-9"]))
    # the generator reloads without data, and a fixed seed reproduces the sample
    gen = load_generator(flow_ckpt)
    assert gen.conditions == ["0-4", "5-9"] and gen.info["canonicalized"]
    a, names = gen.sample(3, "0-4", seed=5)
    b, _ = gen.sample(3, "0-4", seed=5)
    assert names == ["0-4"] * 3 and a.allclose(b)


def test_latent_diffusion_trains_and_samples(task_zoo, tmp_path) -> None:
    dm = GeneratorDataModule(task_zoo, condition="task", batch_size=4)
    task = LatentDiffusionTask(
        chunk=64, ae_hidden=16, latent=2, ae_depth=1, heads=2, hidden=32, depth=1,
        ae_fraction=0.5, timesteps=50, sample_steps=5,
    )  # fmt: skip
    trainer = _trainer(8)
    trainer.fit(task, datamodule=dm)
    assert bool(task.latent_ready)
    path = str(tmp_path / "ldm.ckpt")
    trainer.save_checkpoint(path)
    gen = load_generator(path)
    ws, names = gen.sample(4, seed=0)  # no condition: every condition in turn
    assert names == ["0-4", "5-9", "0-4", "5-9"]
    assert len(ws) == 4 and ws.spec == dm.spec
    assert torch.isfinite(ws.flatten()).all()
    for method in ("ddpm", "ddim"):
        ws2, _ = gen.sample(2, "0-4", method=method, steps=3, guidance=2.0, seed=0)
        assert len(ws2) == 2 and torch.isfinite(ws2.flatten()).all()
    module = ws.load_into(build_module(ARCH), 2)
    assert module(torch.rand(2, 64)).shape == (2, 10)


def test_lightning_losses_decrease_on_real_nets(task_zoo) -> None:
    dm = GeneratorDataModule(task_zoo, batch_size=8)
    dm.setup()
    task = FlowGenerationTask(hidden=64, depth=1, lr=3e-3, cosine=False)
    _trainer(1).fit(task, datamodule=dm)  # builds the nets from the data module
    x, c = dm.vectors, dm.labels
    torch.manual_seed(0)
    opt = torch.optim.Adam(task.net.parameters(), lr=3e-3)

    def eval_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(sum(task.flow.loss(task.net, x, c) for _ in range(20)) / 20)

    before = eval_loss()
    for _ in range(120):
        loss = task.flow.loss(task.net, x, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * before


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--condition", "0-9"], "unknown condition"),
        (["--n", "0"], "--n must be a positive integer"),
        (["--n", "-3"], "--n must be a positive integer"),
        (["--arch", json.dumps({**ARCH, "widths": [16, 8]})], "not 'mlp-i64-w16x8"),
        (["--temperature", "0"], "temperature must be > 0"),
    ],
)
def test_generate_bad_input(flow_ckpt, tmp_path, capsys, extra, message) -> None:
    args = ["--generator", flow_ckpt, "--n", "2", "-o", str(tmp_path / "o"), *extra]
    assert generate_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_generate_rejects_foreign_and_corrupt_checkpoints(tmp_path, capsys) -> None:
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "metanet": {"task": "generalization"}}, other)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint at all")
    plain = tmp_path / "plain.pt"
    torch.save(build_module(ARCH).state_dict(), plain)
    for path, message in (
        (other, "task 'generalization'"),
        (corrupt, "not a readable PyTorch file"),
        (plain, "not a metanet checkpoint"),
        (tmp_path / "missing.ckpt", "no such file"),
    ):
        assert generate_main(["--generator", str(path), "--n", "2", "-o", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err, err
    with pytest.raises(GenerationError, match="task 'generalization'"):
        load_generator(str(other))


def test_unconditional_generator_rejects_conditions(task_zoo) -> None:
    dm = GeneratorDataModule(task_zoo, canonicalize=False)
    task = FlowGenerationTask(hidden=16, depth=1)
    _trainer(1).fit(task, datamodule=dm)
    assert task.conditions == [] and not task.info["canonicalized"]
    with pytest.raises(GenerationError, match="unconditional"):
        task.sample(2, "0-4")
    with pytest.raises(GenerationError, match="positive integer"):
        task.sample(0)


def test_generate_configs_parse() -> None:
    """Every configs/generate run config instantiates through the metanet CLI."""
    from metanet.cli import MetanetCLI

    folder = os.path.join(os.path.dirname(__file__), "..", "configs", "generate")
    configs = [f for f in sorted(os.listdir(folder)) if not f.startswith("zoo")]
    assert len(configs) >= 3
    for name in configs:
        cli = MetanetCLI(
            ["--config", os.path.join(folder, name), "--trainer.max_steps", "2"], run=False
        )
        assert isinstance(cli.model, (FlowGenerationTask, LatentDiffusionTask))
        assert isinstance(cli.datamodule, GeneratorDataModule)


# -- parametrizations (regressions of the near-chance generators) ----------------------------------
def test_latent_diffusion_task_builds_the_configured_autoencoder() -> None:
    """``ae_mixer`` reaches the autoencoder (it was ignored: the configs' "mlp" trained a slow
    transformer autoencoder that could not reconstruct the zoo in the benchmark's budget)."""
    info = {"spec": None, "dim": 0, "conditions": []}
    for mixer in ("mlp", "transformer"):
        task = LatentDiffusionTask(chunk=16, ae_hidden=8, latent=2, ae_mixer=mixer, hidden=8)
        s = WeightSpaceSpec.from_module(build_module(ARCH))
        task.build({**info, "spec": s.to_dict(), "dim": s.num_params})
        assert task.ae.mixer == mixer
        assert hasattr(task.ae, "enc_mlp") == (mixer == "mlp")
    with pytest.raises(GenerationError, match="ae_mixer"):
        LatentDiffusionTask(ae_mixer="conv")


def _oracle(kind: str, point: torch.Tensor, proc) -> torch.nn.Module:
    """A 'network' that outputs the exact target of ``proc`` for data made of one ``point``."""

    class Oracle(torch.nn.Module):
        def forward(self, x, t, c):
            if kind == "data":
                return point.expand_as(x)
            a = proc.abar[(t * proc.num_steps).round().long()][:, None]
            eps = (x - a.sqrt() * point) / (1 - a).sqrt()
            return {
                "x0": point.expand_as(x),
                "eps": eps,
                "v": a.sqrt() * eps - (1 - a).sqrt() * point,
            }[kind]

    return Oracle()


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_diffusion_samplers_follow_the_parametrization(prediction: str) -> None:
    """With the exact target of its parametrization, every sampler returns the single data point
    (checks the x0/eps/v conversions, including the near-singular first cosine step)."""
    point = torch.linspace(-2, 2, 7)
    proc = GaussianDiffusion(200, "cosine", prediction=prediction)
    c = torch.zeros(5, dtype=torch.long)
    for method in ("ddim", "ddpm"):
        out = proc.sample(_oracle(prediction, point, proc), (5, 7), c, steps=20, method=method)
        assert torch.allclose(out, point.expand(5, 7), atol=2e-2), (method, out)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(10, prediction="score")


def test_flow_data_prediction_sampler_reaches_the_data() -> None:
    point = torch.linspace(-2, 2, 7)
    proc = FlowMatching(prediction="data")
    c = torch.zeros(5, dtype=torch.long)
    for method in ("euler", "heun"):
        out = proc.sample(_oracle("data", point, proc), (5, 7), c, steps=4, method=method)
        assert torch.allclose(out, point.expand(5, 7), atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        FlowMatching(prediction="score")


def test_flow_learns_high_dimensional_data_through_a_narrow_backbone() -> None:
    """4 points in 96-D, a backbone 8 wide: predicting the velocity (which contains the full-rank
    ``-x_0``) cannot get rid of the noise; predicting the data can (the bug behind near-chance
    generated digits MLPs)."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(4, 96, generator=gen)
    dists = {}
    for prediction in ("data", "velocity"):
        torch.manual_seed(0)
        net = ResidualMLP(96, 8, 1)
        proc = FlowMatching(prediction=prediction)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        c = torch.zeros(32, dtype=torch.long)
        for _ in range(250):
            loss = proc.loss(net, data[torch.randint(0, 4, (32,))], c)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = proc.sample(net, (32, 96), c, steps=16, generator=torch.Generator().manual_seed(1))
        dists[prediction] = float(nearest_distances(out, data)[0].median())
    spread = float(torch.cdist(data, data).max())  # ~ sqrt(2 * 96) ≈ 14
    assert dists["data"] < 0.2 * spread, dists
    assert dists["velocity"] > 2 * dists["data"], dists


def test_checkpoints_without_prediction_load_as_trained(flow_ckpt) -> None:
    """Checkpoints from before ``prediction`` existed keep their velocity parametrization."""
    ckpt = torch.load(flow_ckpt, map_location="cpu", weights_only=False)
    assert load_generator(ckpt).flow.prediction == "data"
    del ckpt["hyper_parameters"]["prediction"]
    old = load_generator(ckpt)
    assert old.flow.prediction == "velocity"
    a, _ = old.sample(2, "0-4", seed=3)
    assert torch.isfinite(a.flatten()).all()


def test_metanet_sample_and_load_read_a_generator_checkpoint(flow_ckpt, tmp_path) -> None:
    """``metanet.sample(path, n)`` equals the loaded generator's own sample for one seed; a
    condition outside the trained set and a file that is not a generator get clear errors."""
    import metanet
    from metanet.checkpoints import CheckpointError
    from metanet.tasks.generation import GenerationError, GenerationTask

    gen = metanet.load(flow_ckpt)
    assert isinstance(gen, GenerationTask) and not gen.training
    ws = metanet.sample(flow_ckpt, 3, condition="5-9", seed=2)
    ref, _ = gen.sample(3, "5-9", seed=2)
    assert len(ws) == 3 and ws.allclose(ref)
    assert metanet.generate.sample(gen, 3, condition="5-9", seed=2).allclose(ref)
    with pytest.raises(GenerationError, match="3-7"):
        metanet.sample(gen, 2, condition="3-7")
    other = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="without metanet's task metadata"):
        metanet.sample(str(other), 2)
