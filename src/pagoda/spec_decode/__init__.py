"""Speculative decoding: proposers of draft tokens and the rejection sampler that verifies them.

The scheduler decides how many drafts a request may carry (`scheduler/spec_policy.py`); the model
runner asks a proposer for them, runs them through the target with the request's real token, and
lets `RejectionSampler` keep the prefix that leaves the target's output distribution exact.
"""
