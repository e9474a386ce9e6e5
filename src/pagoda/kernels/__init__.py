"""pagoda's native CPU kernels: the lowest layer, importing nothing else of pagoda.

`build` compiles every C++ source of `csrc/` into one module per ISA flavour; `qgemm` is the
quantized product every quantized Linear runs on the CPU; `paged_decode` the decode attention.
"""
