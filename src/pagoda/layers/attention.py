"""Attention over the paged KV cache, for one layer.

New tokens' K/V are written to their slots first, so each query reads its whole context (cached
prefix and the current chunk) from the cache, or from the fresh K/V when nothing was cached.
With `meta.decode_kernel` set (decode_backend.py), decodes over a float CPU cache run a kernel that
reads blocks in place; everything else gathers blocks and runs SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.kv_cache.kv_store import KVStore
from pagoda.layers.attention_metadata import AttentionMetadata
from pagoda.layers.decode_backend import blocks_read_in_place


def paged_attention(
    q: torch.Tensor,  # (T, n_heads, head_dim)
    k: torch.Tensor,  # (T, n_kv_heads, head_dim)
    v: torch.Tensor,  # (T, n_kv_heads, head_dim)
    store: KVStore,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    written: bool = False,  # the caller already wrote k, v to their slots
) -> torch.Tensor:  # (T, n_heads, head_dim)
    if not written:
        store.write(meta.slot_mapping, k, v)
    out = torch.empty_like(q)
    num_decode = meta.num_decode
    kernel = meta.decode_kernel if num_decode else None
    dense = blocks_read_in_place(kernel, store) if kernel is not None else None
    if kernel is not None and dense is not None and q.dtype == torch.float32:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        out[:num_decode] = kernel(
            q[:num_decode], dense[0], dense[1], meta.decode_block_tables,
            meta.decode_context_lens, scale, window)
    elif num_decode:
        assert meta.decode_block_tables is not None
        max_context = meta.decode_block_tables.shape[1] * meta.block_size
        kc, vc = store.gather(meta.decode_block_tables.view(-1))  # (D * ctx, n_kv, hd)
        kc = kc.view(num_decode, max_context, *kc.shape[1:]).transpose(1, 2)
        vc = vc.view(num_decode, max_context, *vc.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:num_decode].unsqueeze(2), kc, vc, attn_mask=meta.decode_mask(window),
            scale=scale, enable_gqa=True)  # (D, n_heads, 1, hd)
        out[:num_decode] = o.squeeze(2)
    for span in meta.prefills:
        end = span.start + span.num_tokens
        qs = q[span.start:end].transpose(0, 1).unsqueeze(0)  # (1, n_heads, n, hd)
        if span.num_cached == 0:
            ks, vs = k[span.start:end], v[span.start:end]
        else:
            assert span.context_blocks is not None
            context = span.num_cached + span.num_tokens
            ks, vs = store.gather(span.context_blocks)
            ks, vs = ks[:context], vs[:context]
        ks = ks.transpose(0, 1).unsqueeze(0)  # (1, n_kv, ctx, hd)
        vs = vs.transpose(0, 1).unsqueeze(0)
        if span.num_cached == 0 and window is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask(window), scale=scale,
                                               enable_gqa=True)
        out[span.start:end] = o.squeeze(0).transpose(0, 1)
    return out

