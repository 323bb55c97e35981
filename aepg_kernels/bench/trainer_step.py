"""`aepg-bench trainer-step`: one training step of a timm ViT-B/16 (random weights, no download)
with LoRA on blocks 0-4, built through the trainer's public API, with the fused aEPG loss
(backend "auto") vs the eager composite, for a 100-class and a 21843-class head: the median step
time and (on a GPU) the peak memory of the step. As the trainer does, the GPU step runs under
bf16 autocast."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch

from aepg_kernels import utils

from .timing import synchronize

GPU_BATCH = 256
CPU_BATCH = 2  # a ViT-B/16 step at batch 256 takes minutes on a 2-core CPU: a small batch says the same there
IMAGE_SIZE = 224
LOSS_BACKENDS = {"fused": "auto", "eager": "eager"}
ALPHA = 0.5  # a constant aEPG schedule (alpha CE + (1 - alpha) EPG)


def default_batch(device: torch.device) -> int:
    return GPU_BATCH if device.type == "cuda" else CPU_BATCH


def build(model_name: str, num_classes: int, loss_backend: str, device: torch.device, image_size: int = IMAGE_SIZE):
    """The model, optimizer and criterion, as the trainer builds them (public train API only)."""
    from aepg_kernels.train import (
        ContinualViT,
        LossConfig,
        ModelConfig,
        OptimConfig,
        PeftConfig,
        build_criterion,
        build_optimizer,
    )

    torch.manual_seed(0)
    kwargs = {} if image_size == IMAGE_SIZE else {"img_size": image_size}
    model = ContinualViT.from_config(
        ModelConfig(name=model_name, pretrained=False, kwargs=kwargs), PeftConfig(kind="lora", blocks=[0, 1, 2, 3, 4])
    )
    model.add_task(num_classes)
    model.to(device).train()
    optimizer = build_optimizer(model.trainable_parameters(), OptimConfig())  # the trainer's, default settings
    criterion = build_criterion(LossConfig(name="aepg", schedule="constant", alpha=ALPHA, backend=loss_backend))
    return model, optimizer, criterion


def time_steps(model, optimizer, criterion, images, labels, device, steps: int, warmup: int) -> Dict[str, object]:
    def step():
        optimizer.zero_grad(set_to_none=True)
        with utils.bf16_autocast(device):
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    synchronize(device)
    baseline = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    result: Dict[str, object] = {"step_ms": statistics.median(times) * 1e3, "steps": steps}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_extra_bytes"] = result["peak_bytes"] - baseline
    else:
        result["peak_note"] = "not measured on a CPU (no allocator statistics)"
    return result


def run(
    device: torch.device,
    batch: int,
    classes: Sequence[int] = (100, 21843),
    steps: int = 5,
    warmup: int = 2,
    model_name: str = "vit_base_patch16_224",
    image_size: int = IMAGE_SIZE,
    report=lambda record: print(format_record(record)),
) -> List[Dict]:
    """One record per (head size, loss): step time and peak memory; `report` gets each as it is done."""
    records = []
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
    for num_classes in classes:
        labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
        for name, backend in LOSS_BACKENDS.items():
            model, optimizer, criterion = build(model_name, num_classes, backend, device, image_size)
            record = {
                "model": model_name,
                "peft": "lora blocks 0-4",
                "batch": batch,
                "classes": num_classes,
                "loss": f"aepg alpha={ALPHA}",
                "loss_backend": name,
                "backend": backend,
            }
            try:
                record.update(time_steps(model, optimizer, criterion, images, labels, device, steps, warmup))
                record["status"] = "ok"
            except Exception as error:  # noqa: BLE001  (e.g. out of memory: recorded, the others still run)
                record.update(status="error", reason=f"{type(error).__name__}: {str(error)[:300]}")
            records.append(record)
            add_speedups(records)
            report(record)
            del model, optimizer, criterion
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return records


def add_speedups(records: List[Dict]) -> None:
    """fused vs eager per head size: eager step time / fused step time."""
    for record in records:
        if record["loss_backend"] != "fused":
            continue
        eager = next((r for r in records if r["classes"] == record["classes"] and r["loss_backend"] == "eager"), None)
        if eager and eager.get("step_ms") and record.get("step_ms"):
            record["speedup_vs_eager"] = eager["step_ms"] / record["step_ms"]


def format_record(record: Dict) -> str:
    if record["status"] != "ok":
        return f"{record['classes']:>6} classes  {record['loss_backend']:<6} {record['status']}: {record['reason']}"
    peak = record.get("peak_bytes")
    peak_text = f"peak {peak / 2**30:.2f} GiB" if peak is not None else "peak not measured (CPU)"
    return (
        f"{record['classes']:>6} classes  {record['loss_backend']:<6} batch {record['batch']}  "
        f"{record['step_ms']:9.1f} ms/step  {peak_text}"
    )
