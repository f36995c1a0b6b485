"""PyTorch side of crates/cots-encoders/examples/effnet_timing.rs:
EfficientNet-Lite0 pooled features (extract_features + mean), batch 32, at
64, 128 and 224 px, 2 threads, eval mode, no grad. Needs the model code of
efficientnet-lite-pytorch==0.1.0 unpacked under the folder given as the
first argument (default /tmp/effnet); weights do not matter for timing.
    python3 benches/reference/effnet_lite0.py [/tmp/effnet]
"""
import sys, time, torch
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "/tmp/effnet")
from efficientnet_lite_pytorch import EfficientNet
torch.set_num_threads(2)
m = EfficientNet.from_name("efficientnet-lite0").eval()
with torch.no_grad():
    for side in (64, 128, 224):
        x = torch.randn(32, 3, side, side)
        f = lambda: m.extract_features(x).mean(dim=(2, 3))
        f(); ts = []
        for _ in range(3):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        ts.sort()
        print(f"torch batch 32 at {side} px: median {ts[1]:.3f} s, min {ts[0]:.3f} s ({32/ts[1]:.1f} images/s)")
