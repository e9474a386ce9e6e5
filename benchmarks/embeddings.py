"""Embedding throughput and latency: `pagoda serve` against the FastAPI wrapper around
sentence-transformers that a user would write, on the same model and the same sentences.

Workloads (each timed over --rounds rounds, medians reported):
  a) one request carrying 256 sentences;
  b) 256 requests of one sentence each, all in flight at once;
  c) (with --gateway-config) workload b again through a `pagoda gateway` whose embedding cache
     already holds every sentence: the cached path.

    python benchmarks/embeddings.py                 # Pagoda (padded and varlen) vs baseline
    python benchmarks/embeddings.py --gateway       # also the gateway's cached path

Run nothing else meanwhile; the CPU model is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from importlib import resources

import aiohttp
from local_servers import free_port, wait_healthy

MODEL = "all-MiniLM-L6-v2"

BASELINE_APP = textwrap.dedent('''
    """What a user would write: sentence-transformers behind a FastAPI route."""
    import os
    from fastapi import FastAPI
    from pydantic import BaseModel
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(os.environ["MODEL_DIR"], device="cpu")
    app = FastAPI()

    class Body(BaseModel):
        input: str | list[str]
        model: str | None = None

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(body: Body):
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors = model.encode(texts)
        return {"object": "list", "model": MODEL,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                         for i, v in enumerate(vectors)]}

    MODEL = "all-MiniLM-L6-v2"
''')


def sentences(count: int) -> list[str]:
    """`count` distinct sentences of 5-40 words from the text shipped with Pagoda."""
    text = (resources.files("pagoda.data") / "devils_dictionary.txt").read_text()
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    picked = [p for p in parts if 5 <= len(p.split()) <= 40]
    if len(picked) < count:
        raise SystemExit("not enough sentences in the corpus")
    return list(dict.fromkeys(picked))[:count]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
        flags = re.search(r"Flags:\s*(.+)", out).group(1).split()
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
        return f"{name} ({', '.join(isa)}), {os.cpu_count()} CPUs"
    except Exception:  # noqa: BLE001 - only a label
        return platform.processor() or "unknown CPU"


def start(cmd: list[str], url: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-embed-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    try:
        wait_healthy(url, proc)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"{cmd[0]} failed; see {log.name}") from None
    return proc


# aiohttp: the load generator shares the 2 cores with the servers, and httpx's client spent more
# CPU per request than the gateway's cached path (it capped that path at ~100 requests/s)
async def one_big_request(url: str, texts: list[str], headers: dict[str, str] | None = None
                          ) -> float:
    async with aiohttp.ClientSession(headers=headers) as client:
        t0 = time.perf_counter()
        async with client.post(url + "/v1/embeddings",
                               json={"model": MODEL, "input": texts}) as r:
            r.raise_for_status()
            assert len((await r.json())["data"]) == len(texts)
        return time.perf_counter() - t0


async def many_small_requests(url: str, texts: list[str], headers: dict[str, str] | None = None
                              ) -> tuple[float, list[float]]:
    connector = aiohttp.TCPConnector(limit=len(texts))
    async with aiohttp.ClientSession(headers=headers, connector=connector) as client:
        async def one(text: str) -> float:
            t0 = time.perf_counter()
            async with client.post(url + "/v1/embeddings",
                                   json={"model": MODEL, "input": text}) as r:
                r.raise_for_status()
                await r.read()
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        latencies = await asyncio.gather(*(one(t) for t in texts))
        return time.perf_counter() - t0, list(latencies)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(name: str, url: str, texts: list[str], rounds: int,
            headers: dict[str, str] | None = None) -> dict[str, float]:
    asyncio.run(one_big_request(url, texts[:16], headers))  # warm-up
    big = [asyncio.run(one_big_request(url, texts, headers)) for _ in range(rounds)]
    walls, lat = [], []
    for _ in range(rounds):
        wall, latencies = asyncio.run(many_small_requests(url, texts, headers))
        walls.append(wall)
        lat += latencies
    row = {"a_emb_s": len(texts) / statistics.median(big), "a_s": statistics.median(big),
           "b_emb_s": len(texts) / statistics.median(walls),
           "b_p50": pct(lat, 0.5), "b_p99": pct(lat, 0.99)}
    print(f"{name:<34} a) {row['a_emb_s']:7.1f} emb/s ({row['a_s'] * 1000:6.0f} ms)   "
          f"b) {row['b_emb_s']:7.1f} emb/s  p50 {row['b_p50'] * 1000:6.0f} ms  "
          f"p99 {row['b_p99'] * 1000:6.0f} ms", flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gateway", action="store_true",
                   help="also measure workload b through a gateway with a warm embedding cache")
    args = p.parse_args()
    texts = sentences(args.count)
    bindir = os.path.dirname(sys.executable)
    print(f"CPU: {cpu_model()}; {len(texts)} sentences, {args.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    results = {}
    from pagoda.loader.model_loader import resolve_model_path

    results["in-process"] = in_process(resolve_model_path(MODEL), texts, args.rounds)

    with tempfile.TemporaryDirectory() as tmp:
        app = os.path.join(tmp, "st_app.py")
        with open(app, "w") as f:
            f.write(BASELINE_APP)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start([os.path.join(bindir, "uvicorn"), "st_app:app", "--app-dir", tmp,
                      "--port", str(port), "--log-level", "warning"], url,
                     {"MODEL_DIR": resolve_model_path(MODEL)})
        try:
            results["baseline"] = measure("sentence-transformers + FastAPI", url, texts,
                                          args.rounds)
        finally:
            proc.terminate()
            proc.wait()
        for attention in ("padded", "varlen"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start([os.path.join(bindir, "pagoda"), "serve", "--model", MODEL,
                          "--port", str(port), "--log-level", "warning",
                          "--embed-attention", attention], url)
            try:
                results[attention] = measure(f"pagoda serve ({attention})", url, texts,
                                             args.rounds)
                if args.gateway and attention == "padded":
                    results["gateway"] = gateway_cached(bindir, url, texts, args.rounds, tmp)
            finally:
                proc.terminate()
                proc.wait()
    base = results["baseline"]
    print(f"in-process encode() vs pagoda serve (padded), workload a: "
          f"{results['padded']['a_emb_s'] / results['in-process']['a_emb_s']:.2f}x")
    for name, row in results.items():
        if name in ("baseline", "in-process"):
            continue
        print(f"{name:<10} vs baseline: a) {row['a_emb_s'] / base['a_emb_s']:.2f}x  "
              f"b) {row['b_emb_s'] / base['b_emb_s']:.2f}x, p99 "
              f"{row['b_p99'] / base['b_p99']:.2f}x")
    return 0


def in_process(model_dir: str, texts: list[str], rounds: int) -> dict[str, float]:
    """Workload a without HTTP: `SentenceTransformer.encode` of the 256 sentences in this
    process (a library user's number, no server at all)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:16])
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model.encode(texts)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    print(f"{'sentence-transformers in-process':<34} a) {len(texts) / seconds:7.1f} emb/s "
          f"({seconds * 1000:6.0f} ms)", flush=True)
    return {"a_emb_s": len(texts) / seconds, "a_s": seconds}


def gateway_cached(bindir: str, upstream: str, texts: list[str], rounds: int,
                   tmp: str) -> dict[str, float]:
    from pagoda.gateway.auth import hash_key

    config = os.path.join(tmp, "gateway.yaml")
    port = free_port()
    with open(config, "w") as f:
        f.write(textwrap.dedent(f"""
            port: {port}
            keys:
              - name: bench
                hash: "{hash_key('bench-key')}"
                models: ["*"]
            models:
              - name: {MODEL}
                upstreams: ["{upstream}"]
        """))
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer bench-key"}
    proc = start([os.path.join(bindir, "pagoda"), "gateway", "--config", config], url)
    try:
        asyncio.run(many_small_requests(url, texts, headers))  # fills the cache
        return measure("gateway, every input cached", url, texts, rounds, headers)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
