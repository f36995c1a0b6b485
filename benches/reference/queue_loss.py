"""PyTorch's naive queue contrastive loss (logits + cross-entropy), forward and
backward, at the shapes of benches/benches/queue.rs. Run beside the Rust
benchmark on the same machine; never needed to build or test."""
import time
import torch

torch.set_num_threads(2)
B, D = 256, 256
for K in (4096, 65536):
    q = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(K, D), dim=1)
    tau = torch.tensor(0.07, requires_grad=True)

    def step():
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / tau
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
        loss.backward()

    step()
    n = 10
    t = time.perf_counter()
    for _ in range(n):
        step()
    print(f"torch naive queue loss fwd+bwd B={B} D={D} K={K}: {(time.perf_counter() - t) / n * 1e3:.1f} ms")
