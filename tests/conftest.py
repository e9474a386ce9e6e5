"""Shared fixtures: the default model is loaded once per test session and shared by engines."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's memory monitor kills a task when the machine passes 95% memory use. In `make test` that
# use is mostly the other pytest worker's (its session models, its servers): a clean-clone run
# peaked at 21.4 of 23.5 GB, and a three-worker run had a Ray-placed rank killed. The tests'
# Ray instances (in-process and `pagoda ray-serve`'s) inherit this and leave the kernel's OOM
# handling as the only limit.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")


def _share_gguf_readers() -> None:
    """Parse each GGUF file once per test session. gguf-py's reader walks every metadata array
    element up front (~30 s for Gemma 3's 262k-token vocabulary), and the same file is opened
    by our loader, transformers' config, weights and tokenizer loaders (the references) — five
    parses of one file. Readers are read-only memory maps, so one instance serves them all; the
    reading code of each party is unchanged. Keyed by size and mtime: a rewritten file is
    parsed again.

    The one parse also runs about twice as fast over a plain read-only ndarray of the mapped
    file than over `np.memmap`, whose subclass hooks run on each of the ~10^6 small slices the
    parser takes: the same bytes and the same parsing code, only the array type differs."""
    import mmap
    import types

    import gguf
    import gguf.gguf_reader
    import numpy as np

    original = gguf.GGUFReader
    readers: dict[tuple[str, int, int], object] = {}

    def plain_map(path, mode="r", **_):
        with open(path, "rb") as f:
            return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)

    numpy_with_plain_map = types.SimpleNamespace(**{**vars(np), "memmap": plain_map})

    def parse(path):
        gguf.gguf_reader.np = numpy_with_plain_map
        try:
            return original(path, "r")
        finally:
            gguf.gguf_reader.np = np

    def shared(path, mode="r"):
        if mode != "r":
            return original(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = parse(path)
        return readers[key]

    gguf.GGUFReader = shared


_share_gguf_readers()


def _memoize_tensor_name_maps() -> None:
    """transformers' GGUF loader builds gguf-py's TensorNameMap for the same (architecture,
    block count) once per module of the model (~400 times, 6 s for SmolLM2); the map is a pure
    function of its arguments and only read, so one per argument pair serves every call."""
    import functools

    import gguf

    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)


_memoize_tensor_name_maps()


def _faster_gguf_values() -> None:
    """transformers' GGUF config and weights loader turns every metadata value into a Python
    value one array element at a time (786k calls for Gemma 3's vocabulary; ~4 s of each of its
    reference loads), each string through `array("B", list(bytes)).tobytes()`. The same values
    come from the element's own bytes; what this does not cover (nested or unknown types) goes
    to transformers' own function. tests/test_conftest_shortcuts.py checks the two agree on
    every field of both GGUF files."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils._gguf_parse_value
    ints, floats = frozenset((0, 1, 2, 3, 4, 5, 10, 11)), frozenset((6, 12))

    def parse(value, data_type):
        if type(data_type) is list:
            if len(data_type) == 1:
                data_type = data_type[0]
            elif len(data_type) == 2 and data_type[0] == 9:
                data_type = data_type[1]  # an array's element: parsed as its element type
            else:
                return original(value, data_type)
        if data_type == 8:
            return value.tobytes().decode()
        if data_type in ints:
            return int(value[0])
        if data_type in floats:
            return float(value[0])
        return original(value, data_type)

    parse.original = original  # type: ignore[attr-defined]
    gguf_utils._gguf_parse_value = parse


_faster_gguf_values()


@pytest.fixture(scope="session")
def loaded_model():
    from pagoda.loader.model_loader import load_model

    return load_model(progress=False)


@pytest.fixture(scope="session")
def default_model(loaded_model):
    """The default model as `pagoda serve` and `LLM()` run it: the GGUF file's own blocks through
    the default kernel plan (igemm for the 4-bit blocks: activations rounded to int8 per block).
    `loaded_model` is the same weights in fp32, the transformers-identical reference."""
    from pagoda.loader.model_loader import load_model
    from pagoda.quant import apply_quantization

    model = load_model(loaded_model.path, progress=False)
    apply_quantization(model, "gguf")
    return model


@pytest.fixture(scope="session")
def make_engine(loaded_model):
    """Build an engine around the shared weights with the given config overrides."""
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine

    def make(**overrides):
        overrides.setdefault("kv_cache_memory", 64 << 20)
        overrides.setdefault("progress", False)
        return LLMEngine(EngineConfig(**overrides), loaded=loaded_model)

    return make


@pytest.fixture(scope="session")
def hf_model(loaded_model):
    """Hugging Face transformers' own model on the same GGUF (the reference)."""
    from transformers import AutoModelForCausalLM

    path = loaded_model.path
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def computed_once(tmp_path_factory, worker_id):
    """`computed_once(name, compute)`: compute a JSON-able value once per test run and share it
    with every pytest-xdist worker (pytest-xdist's documented pattern: a file in the run's
    shared temporary folder, written under a lock). A reference that takes seconds (a
    transformers generate) is then computed by whichever worker needs it first, and the other
    reads it; it is never stored between runs."""
    import json

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent

    def get(name: str, compute):
        if worker_id == "master":  # no xdist: nothing to share
            return compute()
        path = root / f"{name}.json"
        with FileLock(f"{path}.lock"):
            if not path.is_file():
                path.write_text(json.dumps(compute()))
            return json.loads(path.read_text())

    return get


@pytest.fixture(scope="session")
def prompt_ids(loaded_model):
    """The token ids of tests/engine/test_hf_reference.py's prompts."""
    from tests.engine.test_hf_reference import PROMPTS

    return [loaded_model.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="session")
def hf_computed(request, computed_once, loaded_model, prompt_ids):
    """What the tests take from transformers' SmolLM2, computed in one place so that one run
    loads the reference model once (~10 s on a busy 2-core machine) whichever worker asks first:
    - "greedy": the greedy continuation of each of `prompt_ids` (`reference` below);
    - "prompt_logprobs": {text: [ids, [[log-prob of the next prompt token, top-3 token ids]
      per position]]} of tests/engine/test_prompt_logprobs.py's prompts;
    - "last_hidden": the L2-normalized last-token hidden state of the first ten
      tests/embeddings/texts.py texts (tests/embeddings/test_decoder_embedding.py)."""
    from tests.embeddings.texts import TEXTS
    from tests.engine.helpers import hf_greedy
    from tests.engine.test_hf_reference import MAX_TOKENS
    from tests.engine.test_prompt_logprobs import PROMPTS as SCORED

    def compute():
        hf = request.getfixturevalue("hf_model")
        encode = loaded_model.tokenizer.encode
        scored = {}
        with torch.inference_mode():
            for text in SCORED:
                ids = encode(text)
                rows = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
                scored[text] = [ids, [[rows[i - 1, ids[i]].item(),
                                       torch.topk(rows[i - 1], 3).indices.tolist()]
                                      for i in range(1, len(ids))]]
            hidden = torch.stack([hf.model(torch.tensor([encode(t)])).last_hidden_state[0, -1]
                                  for t in TEXTS[:10]])
        return {"greedy": hf_greedy(hf, prompt_ids, MAX_TOKENS), "prompt_logprobs": scored,
                "last_hidden": torch.nn.functional.normalize(hidden, dim=1).tolist()}

    return computed_once("smollm2_hf", compute)


@pytest.fixture(scope="session")
def reference(hf_computed):
    """transformers' greedy continuation of each of `prompt_ids` (the reference of the engine,
    parallel and Ray tests). Defined here, not in a test module: a session fixture imported
    into several modules is a separate fixture in each, computed once per module."""
    return hf_computed["greedy"]


@pytest.fixture(scope="session")
def gguf_draft(loaded_model):
    """The default model again, on its GGUF blocks through qgemm (int8 activations), for the
    speculative decoding tests: an imperfect draft, so they see rejections. (Through wgemm the
    blocks give the fp32 target's own product and every draft is accepted.)"""
    from pagoda.loader.model_loader import load_model
    from pagoda.quant import apply_quantization

    draft = load_model(loaded_model.path, progress=False)
    apply_quantization(draft, "gguf", backend="qgemm")
    return draft


@pytest.fixture(scope="session")
def int4_draft(loaded_model):
    """int4 groups of the fp32 weights through the default kernel (igemm): a weaker draft than
    the file's blocks, as its lm_head is rounded to 4 bits."""
    from pagoda.loader.model_loader import load_model
    from pagoda.quant import apply_quantization

    draft = load_model(loaded_model.path, progress=False)
    apply_quantization(draft, "int4")
    return draft


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The packaged all-MiniLM-L6-v2 (sentence-transformers layout)."""
    from pagoda.loader.model_loader import resolve_model_path

    return resolve_model_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def sentence_transformer(minilm_dir):
    """The reference: sentence-transformers on the same files."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_dir, device="cpu")


@pytest.fixture(scope="session")
def thread_server():
    """One `pagoda serve` (API key on, engine in a thread) shared by the whole session: the
    server, reliability and operations tests run against it as `server`."""
    from tests.server.server_process import serving

    # info: uvicorn's WebSocket lines are logged, which the key-redaction test reads
    with serving("--engine-thread", "--max-waiting", "512", "--log-level", "info") as proc:
        yield proc


@pytest.fixture(scope="session")
def server(thread_server):
    return thread_server


# The longest test files (model loads, real servers, Ray), measured by `make test`'s durations.
# pytest-xdist's loadfile hands files to whichever worker is free, in collection order: starting
# with these keeps one worker from running a long file alone at the end (longest first).
LONGEST_FILES = (
    "tests/cluster/test_ray_serve.py",
    "tests/engine/test_gemma3.py",
    "tests/parallel/test_pipeline_parallel.py",
    "tests/engine/test_equivalence.py",
    "tests/spec_decode/test_greedy_equivalence.py",
    "tests/parallel/test_nodes.py",
    "tests/parallel/test_tensor_parallel.py",
    "tests/spec_decode/test_server.py",
    "tests/structured_output/test_engine_constraints.py",
    "tests/spec_decode/test_engine_behaviour.py",
    "tests/parallel/test_ray_executor.py",
    "tests/server/test_quantized_server.py",
    "tests/engine/test_threads.py",
    "tests/parallel/test_parallel_server.py",
    "tests/server/test_limits.py",
    "tests/server/test_embeddings_api.py",
    "tests/engine/test_hf_reference.py",
    "tests/gateway/test_gateway_real_replicas.py",
    "tests/quant/test_fused_layer.py",
    "tests/reliability/test_schemathesis.py",
    "tests/cli/test_cli.py",
    "tests/spec_decode/test_rejection_sampler.py",
    "tests/embeddings/test_encoder.py",
    "tests/engine/test_sliding_window_kv.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}

    def key(item: pytest.Item) -> int:
        path = os.path.relpath(str(item.path), str(config.rootpath))
        return rank.get(path, len(LONGEST_FILES))

    items.sort(key=key)  # stable: each file keeps its order, the rest keep theirs
