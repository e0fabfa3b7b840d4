"""TensorFlow-exact candidate samplers and sampled losses in PyTorch, on CPU and GPU.

Shapes: ``B`` batch, ``T`` num_true, ``S`` num_sampled, ``C`` num_classes, ``D`` dim.
"""

from sampler._checks import unchecked
from sampler.candidate_sampling import (
    FixedUnigramSampler,
    LearnedUnigramSampler,
    LogUniformSampler,
    RangeSampler,
    SampledValues,
    UniformSampler,
    all_candidate_sampler,
    compute_accidental_hits,
    fixed_unigram_candidate_sampler,
    learned_unigram_candidate_sampler,
    log_uniform_candidate_sampler,
    uniform_candidate_sampler,
)
from sampler.embedding import embedding_lookup, gather_rows
from sampler.losses import (
    SampledSoftmaxLoss,
    compute_sampled_logits,
    nce_loss,
    sampled_softmax_loss,
)
from sampler.optim import SparseAdam

__all__ = [
    "FixedUnigramSampler",
    "LearnedUnigramSampler",
    "LogUniformSampler",
    "RangeSampler",
    "SampledSoftmaxLoss",
    "SampledValues",
    "SparseAdam",
    "UniformSampler",
    "all_candidate_sampler",
    "compute_accidental_hits",
    "compute_sampled_logits",
    "embedding_lookup",
    "fixed_unigram_candidate_sampler",
    "gather_rows",
    "learned_unigram_candidate_sampler",
    "log_uniform_candidate_sampler",
    "nce_loss",
    "sampled_softmax_loss",
    "unchecked",
    "uniform_candidate_sampler",
]
