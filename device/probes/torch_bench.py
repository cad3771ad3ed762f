"""Issue 15's PyTorch benchmark, one process's share: each workload warms up, then runs
BENCH_REPS timed repetitions; prints one `result NAME VALUE UNIT CHECK` line per repetition
(VALUE: ms per step, or tokens per second; CHECK: a number from the workload's output, the
same natively and through libvgpu when the GPU computed the same thing). device/torch-bench.sh
runs this natively and through libvgpu in alternation and summarises. Not a test: it checks
nothing itself. No network: GPT-2 is built from a config with random weights."""
import os
import sys
import time
import traceback

import torch

dev = "cuda"
reps = int(os.environ.get("BENCH_REPS", "5"))
only = os.environ.get("BENCH_ONLY", "").split()


metrics_url = os.environ.get("BENCH_METRICS_URL")


def scrape():
    """host-proxy's per-request counts and seconds by request name (summed over zones), from
    its Prometheus endpoint; empty without BENCH_METRICS_URL (native runs)."""
    if not metrics_url:
        return {}
    import re
    import urllib.request
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {}
    pat = re.compile(r'^vgpu_zone_request_seconds_(count|sum)\{[^}]*request="([^"]+)"[^}]*\} (\S+)$')
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            kind, req, v = m.groups()
            entry = out.setdefault(req, [0.0, 0.0])
            entry[0 if kind == "count" else 1] += float(v)
    return out


def requests_between(name, before, after, per, unit):
    """Prints `requests NAME REQUEST COUNT-PER-UNIT MEAN-US` for what reached the host between
    two scrapes, most frequent first."""
    rows = []
    for req, (n, secs) in after.items():
        n0, s0 = before.get(req, (0.0, 0.0))
        if n - n0 > 0:
            rows.append((req, (n - n0) / per, (secs - s0) * 1e6 / (n - n0)))
    for req, n, us in sorted(rows, key=lambda r: -r[1]):
        print(f"requests {name} {req} {n:.2f}/{unit} {us:.2f}us", flush=True)


def result(name, value, unit, check):
    print(f"result {name} {value:.6g} {unit} {check:.6g}", flush=True)


def timed(fn, iters):
    """Mean milliseconds per call of `fn` over `iters` calls, synchronised at the end."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters, out


def workload(name, by_default=True):
    def wrap(fn):
        if (not only and by_default) or name in only:
            try:
                fn(name)
            except Exception as e:  # noqa: BLE001 - one failed workload must not hide the others
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"FAIL: {name}: {type(e).__name__}: {first[:300]}", flush=True)
                if os.environ.get("BENCH_TRACEBACK"):
                    traceback.print_exc()
        return fn
    return wrap


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 4096), torch.nn.GELU(),
        torch.nn.Linear(4096, 1024)).to(dev)


@workload("mlp_train_step")
def _(name):
    """A 3-layer MLP's forward, backward and AdamW step (batch 256), eager mode."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 1024, device=dev, generator=None)
    y = torch.randn(256, 1024, device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    timed(step, 20)
    for _ in range(reps):
        ms, loss = timed(step, 100)
        result(name, ms, "ms", loss.item())


@workload("mlp_graph_replay")
def _(name):
    """The same training step captured whole in a CUDA graph (capturable AdamW) and replayed."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)
    x = torch.randn(256, 1024, device=dev)
    y = torch.randn(256, 1024, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    timed(g.replay, 20)
    for _ in range(reps):
        ms, _ = timed(g.replay, 100)
        result(name, ms, "ms", loss.item())


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)
    return cfg, GPT2LMHeadModel(cfg).to(dev)


@workload("gpt2_train_step")
def _(name):
    """GPT-2 small (random weights): forward, backward and AdamW step, batch 8 × 128 tokens,
    bf16 autocast."""
    cfg, model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (8, 128), device=dev, generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    timed(step, 3)
    for _ in range(reps):
        ms, loss = timed(step, 10)
        result(name, ms, "ms", loss.item())


@workload("gpt2_generate")
def _(name):
    """GPT-2 small generate(): 128 new tokens after 8, batch 1, greedy (launch-bound)."""
    cfg, model = gpt2()
    model.eval()
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), device=dev, generator=gen)

    def run():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                                  pad_token_id=0)

    timed(run, 1)
    before = scrape()
    for _ in range(reps):
        ms, out = timed(run, 1)
        result(name, 128 / (ms / 1e3), "tokens/s", float(out.sum().item()))
    if before:
        requests_between(name, before, scrape(), 128 * reps, "token")


@workload("gpt2_generate_graphs", by_default=False)
def _(name):
    """The same generate() with a static KV cache and the model's forward compiled with
    torch.compile(mode="reduce-overhead"): each decode step replays a CUDA graph. Not run by
    default (compiling takes a minute or more per process); BENCH_ONLY names it."""
    cfg, model = gpt2()
    model.eval()
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), device=dev, generator=gen)
    model.generation_config.cache_implementation = "static"
    # transformers compiles the forward itself for a static cache (its CompileConfig:
    # mode "reduce-overhead", i.e. CUDA graphs), marking each step for cudagraph trees.
    from transformers import CompileConfig
    model.generation_config.compile_config = CompileConfig(mode="reduce-overhead")

    def run():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                                  pad_token_id=0)

    t0 = time.perf_counter()
    for _ in range(3):
        timed(run, 1)
    compiled = hasattr(model, "_compiled_call")
    print(f"{name}: compiled ({compiled}) and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    before = scrape()
    for _ in range(reps):
        ms, out = timed(run, 1)
        result(name, 128 / (ms / 1e3), "tokens/s", float(out.sum().item()))
    if before:
        requests_between(name, before, scrape(), 128 * reps, "token")


try:
    import transformers
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
except ImportError:
    versions = f"torch {torch.__version__}"
print(f"bench done: {versions}, {torch.cuda.get_device_name(0)}", flush=True)
sys.exit(0)
