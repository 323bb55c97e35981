"""aepg-bench's GPU metrics on a real card (skipped without CUDA): every metric of a launch-bound
case is measured, our fused backends do not synchronise the host and add at most the gradient."""

import pytest
import torch

from aepg_kernels.bench import implementations, measure, timing
from aepg_kernels.bench.sweeps import Case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_host_sync_detects_a_synchronising_call_and_restores_the_mode():
    x = torch.ones(4, device="cuda")
    previous = torch.cuda.get_sync_debug_mode()
    synced, message = timing.host_sync(lambda: x.sum().item())
    assert synced and "synchronizing" in message
    assert timing.host_sync(lambda: x * 2) == (False, "")
    assert torch.cuda.get_sync_debug_mode() == previous


def test_run_case_measures_every_gpu_metric_of_a_small_case():
    device = torch.device("cuda")
    impls = implementations.select(device, ["lean-eager", "reference", *implementations.FUSED_BACKENDS])
    fused = [impl.name for impl in impls if impl.fused]
    assert fused, "no fused backend available on this GPU"
    settings = measure.RunSettings(device, torch.cuda.get_device_properties(device).total_memory)
    case = Case("aepg", "fwd+bwd", "fp32", 256, 100)
    assert measure.launch_bound(case)
    records = {r["implementation"]: r for r in measure.run_case(case, impls, settings, copy_gbps=None)}
    for name in ["lean-eager", "reference", *fused]:
        r = records[name]
        assert r["status"] == "ok", (name, r.get("reason"))
        for key in ("graph_us", "back_to_back_us", "kernels_per_call", "peak_extra_bytes"):
            assert r.get(key) is not None, (name, key, r)
        for key in ("profile_error", "graph_error", "graph_skipped", "back_to_back_error"):
            assert key not in r, (name, key, r[key])
    for name in fused:
        assert records[name]["host_sync"] is False, records[name].get("host_sync_error")
        assert records[name]["peak_extra_over_logits"] <= 1.5, records[name]["peak_extra_bytes"]
