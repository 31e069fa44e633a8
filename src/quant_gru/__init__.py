"""quant_gru: a drop-in torch.nn.GRU that trains, quantizes exactly and exports.

Importing this package imports neither triton nor initialises CUDA.
"""

from quant_gru.module import QuantGRU

__all__ = ["QuantGRU", "__version__"]
__version__ = "0.1.0"
