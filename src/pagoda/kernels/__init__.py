"""pagoda's native CPU kernels: the lowest layer, importing nothing else of pagoda.

`build` compiles every C++ source of `csrc/` into one module per ISA flavour; `igemm` (4- and
8-bit weights, int8 activations: an integer GEMM), `wgemm` (weights widened to fp32) and
`qgemm` (int8 activations, a GEMV) are the quantized products the quantized Linears run on the
CPU; `paged_decode` the decode attention.
"""
