"""A first look at PyTorch through libvgpu (issue 15's starting point, not its test suite):
device discovery, a cuBLAS matmul checked against the CPU, a 3-layer MLP's AdamW step, and
a reduction. Prints one `ok:`/`FAIL:` line per check; run natively and through libvgpu by
device/diag.sh. No network: nothing is downloaded."""
import sys
import time

import torch

def check(cond, what):
    print(("ok: " if cond else "FAIL: ") + what, flush=True)
    return cond

good = check(torch.cuda.is_available(), f"torch.cuda.is_available() (torch {torch.__version__})")
if not good:
    sys.exit(1)
check(torch.cuda.device_count() == 1, f"device_count() = {torch.cuda.device_count()}")
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory >> 20} MiB, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}")
torch.manual_seed(0)
a = torch.randn(512, 512)
b = torch.randn(512, 512)
c = (a.cuda() @ b.cuda()).cpu()
check(torch.allclose(c, a @ b, rtol=1e-3, atol=1e-3), "matmul (cuBLAS) matches the CPU")
s = torch.arange(1_000_000, device="cuda", dtype=torch.float64).sum().item()
check(s == 499999500000.0, f"reduction: {s}")
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                            torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(64, 256, device="cuda")
y = torch.randint(0, 10, (64,), device="cuda")
losses = []
for step in range(20):
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
check(losses[-1] < losses[0], f"MLP AdamW: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(100):
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
torch.cuda.synchronize()
print(f"MLP training step: {(time.perf_counter() - t0) * 1e3 / 100:.3f} ms (mean of 100; a first look, not a benchmark)")
print(f"memory allocated: {torch.cuda.memory_allocated() >> 10} KiB")
