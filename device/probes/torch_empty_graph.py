"""What CUDAGraphTreeManager (torch.compile mode="reduce-overhead") does first: an empty
capture on its own stream and graph pool, thread-local capture mode. Through libvgpu it
failed with "invalid argument" at capture_end (2026-12-04: cuGraphGetNodes of the empty
graph); run by device/diag.sh."""
import torch

g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream()
pool = torch.cuda.graph_pool_handle()
with torch.cuda.graph(g, pool=pool, stream=s, capture_error_mode="thread_local"):
    pass
g.replay()
torch.cuda.synchronize()
x = torch.ones(16, device="cuda")
g2 = torch.cuda.CUDAGraph()
with torch.cuda.graph(g2, pool=pool, stream=s, capture_error_mode="thread_local"):
    y = x * 2
g2.replay()
torch.cuda.synchronize()
print("empty graph ok; graph of one kernel:", y.sum().item())
