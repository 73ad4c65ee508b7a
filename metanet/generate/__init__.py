"""Weight generators: new networks sampled from a learned distribution over a zoo's weights.

* :mod:`~metanet.generate.data`: :class:`GeneratorDataModule` (flat, standardized, optionally
  canonicalized weight vectors of one zoo architecture, with condition labels); a
  :class:`FlatLayout` reads an architecture without a weight space (BatchNorm CNNs, user modules)
  as one parameter vector;
* :mod:`~metanet.generate.canonicalize`: Git Re-Basin alignment of a zoo to a reference network
  (:class:`ChannelPermutations` and :func:`canonicalize_params` for flat layouts of chains with
  BatchNorm), nearest-neighbour distances for novelty;
* :mod:`~metanet.generate.autoencoder`: the parameter autoencoder of latent diffusion (p-diff);
* :mod:`~metanet.generate.diffusion`: DDPM noise schedules, loss, DDPM/DDIM samplers;
* :mod:`~metanet.generate.flow`: flow matching with Euler/Heun ODE samplers;
* :mod:`~metanet.generate.backbones`: residual-MLP and chunk-token transformer denoisers;
* :mod:`~metanet.generate.taskzoo`: a multi-task (digit class subsets) MLP zoo for conditioning;
* :mod:`~metanet.generate.evaluate`: test accuracy of generated classifiers, validation/test
  splits, median/mean accuracy with best-of-N chosen on validation;
* :mod:`~metanet.generate.novelty`: error overlap (max IoU of misclassified test samples against
  the training checkpoints) and aligned L2 nearest-neighbour distance, memorization flags, the
  novelty-vs-accuracy plot;
* :mod:`~metanet.generate.baselines`: training checkpoints, checkpoint + noise, averages of
  aligned checkpoints, a diagonal Gaussian of the aligned zoo;
* :mod:`~metanet.generate.selection`: :class:`SelectOnValidation`, a callback that chooses a
  generator's checkpoint on the validation split;
* :mod:`~metanet.generate.sampling`: :func:`sample`, networks from a trained generator (an
  object or a checkpoint path);
* :mod:`~metanet.generate.cli`: ``metanet generate``.

The LightningModules live in :mod:`metanet.tasks.generation`.
"""

from metanet.generate.autoencoder import ParamAutoencoder
from metanet.generate.backbones import ResidualMLP, TokenTransformer
from metanet.generate.canonicalize import (
    ChannelPermutations,
    canonicalize,
    canonicalize_params,
    nearest_distances,
    pick_reference,
)
from metanet.generate.data import FlatLayout, GeneratorDataModule, ZooInputError, network_layout
from metanet.generate.diffusion import GaussianDiffusion, make_betas
from metanet.generate.flow import FlowMatching
from metanet.generate.sampling import sample

__all__ = [
    "ChannelPermutations",
    "FlatLayout",
    "FlowMatching",
    "GaussianDiffusion",
    "GeneratorDataModule",
    "ParamAutoencoder",
    "ResidualMLP",
    "TokenTransformer",
    "ZooInputError",
    "canonicalize",
    "canonicalize_params",
    "make_betas",
    "nearest_distances",
    "network_layout",
    "pick_reference",
    "sample",
]
