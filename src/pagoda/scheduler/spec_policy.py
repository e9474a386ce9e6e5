"""How many draft tokens each request gets this step, and the speculative decoding counters.

Speculation pays while a step is bound by streaming the weights: at batch 1, verifying k drafted
tokens costs about what one token costs. As the running batch grows the step becomes
compute-bound and rejected drafts are pure waste, so the policy speculates only while at most
`max_batch` requests run (measured: docs/spec_decode.md), and per request only as deep as its
measured acceptance makes worthwhile.

Acceptance model: each drafted position is accepted with probability `a` given that the ones
before it were, so position j is reached with probability a**(j-1) and accepted with a**j. A
request drafts j positions while a**j >= depth_floor: the cost of one more draft token over its
expected gain. A draft model pays a forward pass per draft token (floor 0.2); prompt lookup pays
only the extra verified row, nearly free at small batches (floor 0.05). `a` is estimated per
request from (accepted, trials) counts with exponential decay, where the trials of a step are its
accepted drafts plus the first rejected one.

Alone (one request running), prompt lookup drafts against `solo_depth_floor` and never drops to
probing: its acceptance is bimodal (a quoted span is accepted whole, free text is not), so the
running estimate lags each switch into a quote, and a wrong draft costs only rows riding on a
step bound by streaming the weights, taken from no other request. Measured on the Zen 4 with
the fp32 target (docs/spec_decode.md): grounded prompts 1.91-1.95x vs 1.79-1.80x for the shared
floor with probing, chat 1.23-1.26x vs 1.22-1.24x; at 4 and 8 concurrent the deeper drafts cost
throughput (0.89x vs 1.00x at 8), hence alone only. For the same reason a request alone may
draft up to `solo_num_speculative_tokens` (prompt lookup on full-precision linears: 16 where a
batch drafts 8; engine/config.py's DEFAULT_NGRAM has the measurement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.scheduler.request import Request

DECAY = 0.8  # weight of a request's past steps in its acceptance estimate
PRIOR = (1.4, 2.0)  # (accepted, trials) before any step: a = 0.7
PROBE_EVERY = 8  # a request below min_acceptance still drafts one token every this many steps


@dataclass(frozen=True)
class SpecDecodeConfig:
    num_speculative_tokens: int = 0  # 0: speculation off
    max_batch: int = 8  # speculate only while at most this many requests run
    min_acceptance: float = 0.15  # below this a request only probes now and then
    depth_floor: float = 0.2  # draft position j only while it is accepted with this probability
    solo_depth_floor: float | None = None  # the floor when one request runs (None: depth_floor)
    # the most drafts when one request runs (None: num_speculative_tokens)
    solo_num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be between 0 and 16")
        if self.solo_num_speculative_tokens is not None and not (
                self.num_speculative_tokens and 1 <= self.solo_num_speculative_tokens <= 16):
            raise ValueError("solo_num_speculative_tokens must be between 1 and 16, with "
                             "speculation on")
        if self.max_batch < 1:
            raise ValueError("speculative max_batch must be positive")


@dataclass
class SpecState:
    """A request's acceptance record (owned by the policy, keyed by req_id)."""

    accepted: float = PRIOR[0]
    trials: float = PRIOR[1]
    num_steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.trials

    def record(self, num_accepted: int, num_drafted: int) -> None:
        """A step's trials are its accepted drafts plus the first rejected one."""
        trials = num_accepted + (1 if num_accepted < num_drafted else 0)
        self.accepted = DECAY * self.accepted + num_accepted
        self.trials = DECAY * self.trials + trials

    def next_depth(self, limit: int, floor: float, min_acceptance: float | None) -> int:
        """Positions to draft this step (counted as a step): j while a^j >= floor, up to
        `limit`; below `min_acceptance` (None: never) one probe every PROBE_EVERY steps."""
        self.num_steps += 1
        a = self.acceptance
        if min_acceptance is not None and a < min_acceptance:
            return 1 if self.num_steps % PROBE_EVERY == 0 else 0
        depth = 1
        while depth < limit and a ** (depth + 1) >= floor:
            depth += 1
        return depth


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # verify passes that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)


class SpecPolicy:
    def __init__(self, config: SpecDecodeConfig):
        self.config = config
        self.states: dict[str, SpecState] = {}
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * self.max_depth)

    @property
    def enabled(self) -> bool:
        return self.config.num_speculative_tokens > 0

    @property
    def max_depth(self) -> int:
        """The most drafts a request can get in a step (alone or not)."""
        c = self.config
        return max(c.num_speculative_tokens, c.solo_num_speculative_tokens or 0)

    def num_spec_tokens(self, request: Request, num_running: int, budget: int) -> int:
        """Draft tokens for a decoding request this step (`budget`: tokens left after its own)."""
        if (not self.enabled or not request.sampling_params.speculative
                or num_running > self.config.max_batch):
            return 0
        c = self.config
        alone = num_running == 1
        solo = alone and c.solo_depth_floor is not None
        limit = c.solo_num_speculative_tokens if alone and c.solo_num_speculative_tokens \
            else c.num_speculative_tokens
        depth = self.states.setdefault(request.req_id, SpecState()).next_depth(
            limit, c.solo_depth_floor if solo else c.depth_floor,
            None if solo else c.min_acceptance)
        # A step emits at most depth + 1 tokens and writes depth + 1 positions.
        room = min(request.max_tokens - len(request.output_token_ids) - 1,
                   request.max_total_tokens - request.num_tokens)
        return max(0, min(depth, budget, room))

    def record(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        if num_drafted <= 0:
            return
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += num_drafted
        s.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            s.accepted_per_pos[pos] += 1
        self.states.setdefault(req_id, SpecState()).record(num_accepted, num_drafted)

    def forget(self, req_id: str) -> None:
        self.states.pop(req_id, None)
