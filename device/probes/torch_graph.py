"""PyTorch CUDA graphs (issue 15): capture a small MLP step with torch.cuda.graph, replay it,
compare with eager results, and time eager launches against graph replays (median of rounds).
Run natively and through libvgpu by device/diag.sh; prints `ok:`/`FAIL:` lines."""
import statistics
import sys
import time

import torch

dev = "cuda"
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
).to(dev)
static_in = torch.randn(64, 256, device=dev)

# Warm up on a side stream, as PyTorch's documentation asks before capture.
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s), torch.no_grad():
    for _ in range(3):
        model(static_in)
torch.cuda.current_stream().wait_stream(s)

g = torch.cuda.CUDAGraph()
with torch.no_grad(), torch.cuda.graph(g):
    static_out = model(static_in)

fails = 0
for i in range(5):
    x = torch.randn(64, 256, device=dev)
    static_in.copy_(x)
    g.replay()
    with torch.no_grad():
        want = model(x)
    torch.cuda.synchronize()
    if not torch.allclose(static_out, want, atol=1e-5):
        fails += 1
print(("ok" if fails == 0 else "FAIL") + f": graph replay matches eager in {5 - fails} of 5 rounds", flush=True)


def timed(fn, n=200, rounds=7):
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(out), min(out), max(out)


with torch.no_grad():
    e = timed(lambda: model(static_in))
r = timed(g.replay)
print(f"ok: eager forward {e[0]:.1f} us (min {e[1]:.1f}, max {e[2]:.1f}); "
      f"graph replay {r[0]:.1f} us (min {r[1]:.1f}, max {r[2]:.1f}) per step, median of 7 rounds of 200", flush=True)
sys.exit(1 if fails else 0)
