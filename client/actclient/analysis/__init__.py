"""Analysis of activation shards: layer redundancy, per-site statistics and pruning plans.

`stats` holds the streaming math, `analyze` turns shards into analysis.json, arrays, pictures
and a report, `plan` turns an analysis into layer and neuron pruning plans. Needs numpy and
h5py only (matplotlib for pictures); never vllm or torch.
"""

from actclient.analysis.analyze import AnalysisError, analyze, write_analysis
from actclient.analysis.plan import PlanError, layer_plan, make_plan, neuron_plan
from actclient.analysis.stats import AnalysisAccumulator, ChannelStats, MassiveRule, ResidualStats

__all__ = [
    "AnalysisAccumulator",
    "AnalysisError",
    "ChannelStats",
    "MassiveRule",
    "PlanError",
    "ResidualStats",
    "analyze",
    "layer_plan",
    "make_plan",
    "neuron_plan",
    "write_analysis",
]
