"""Scale encoding and the integer constants of the quantized GRU (reference/README.md §2, §4, §6).

This is the one piece of arithmetic the realizations of the integer model share: everything here
runs on the host, once per set of quantization parameters.
"""
