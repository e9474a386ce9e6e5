"""Structured output: constraints compiled into grammars (xgrammar) that mask the sampler."""
