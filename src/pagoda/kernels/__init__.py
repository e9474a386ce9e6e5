"""pagoda's native CPU kernels: the lowest layer, importing nothing else of pagoda.

`build` compiles every C++ source of `csrc/` into one module per ISA flavour; `wgemm` (weights
widened to fp32) and `qgemm` (int8 activations) are the quantized products the quantized Linears
run on the CPU; `paged_decode` the decode attention.
"""
