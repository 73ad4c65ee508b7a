"""Weight spaces: batches of networks of one architecture as per-layer tensors, and symmetries.

``WeightSpaceSpec`` says which layers a family has and which neuron permutation acts on each axis;
``WeightSpace`` holds ``B`` networks (weights ``[B, out, in, *kernel]``, biases ``[B, out]``);
``permute`` / ``relu_scale`` apply the symmetries that leave each network's function unchanged;
``weight_matching`` / ``align`` (Git Re-Basin) and the augmentations of ``augment`` build on them.
"""

from metanet.weightspace.align import align, interpolate, loss_barrier, weight_matching
from metanet.weightspace.augment import (
    AlignedMixUp,
    Compose,
    GaussianNoise,
    RandomInputAffine,
    RandomPermutation,
    RandomSignFlip,
    ReLUScale,
    WeightDropout,
    WeightSpaceTransform,
)
from metanet.weightspace.input_transform import affine_input, random_affine
from metanet.weightspace.space import WeightSpace
from metanet.weightspace.spec import LayerSpec, WeightSpaceError, WeightSpaceSpec
from metanet.weightspace.symmetry import (
    canonical_relu_scales,
    canonical_signs,
    flip_signs,
    identity_permutation,
    invert_permutation,
    permute,
    random_permutation,
    random_relu_scale,
    random_signs,
    relu_scale,
    relu_scale_canonical,
    sign_canonical,
)

__all__ = [
    "AlignedMixUp",
    "Compose",
    "GaussianNoise",
    "RandomInputAffine",
    "RandomPermutation",
    "RandomSignFlip",
    "ReLUScale",
    "WeightDropout",
    "WeightSpaceTransform",
    "affine_input",
    "align",
    "interpolate",
    "loss_barrier",
    "weight_matching",
    "LayerSpec",
    "WeightSpace",
    "WeightSpaceError",
    "WeightSpaceSpec",
    "canonical_relu_scales",
    "canonical_signs",
    "flip_signs",
    "identity_permutation",
    "invert_permutation",
    "permute",
    "random_affine",
    "random_permutation",
    "random_relu_scale",
    "random_signs",
    "relu_scale",
    "relu_scale_canonical",
    "sign_canonical",
]
