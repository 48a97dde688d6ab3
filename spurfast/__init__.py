"""spurfast: find which neurons memorize which training examples, at the cost of a training step.

Public API (everything else is internal)::

    import spurfast as sf
    stats = sf.NeuronStats(model, num_groups=4)
    with stats.record(group_ids):
        F.cross_entropy(model(x), y).backward()
"""
from spurfast import ops
from spurfast._extension import build_info
from spurfast.capture import NeuronStats

__version__ = "0.1.0"
__all__ = ["NeuronStats", "build_info", "ops", "__version__"]
