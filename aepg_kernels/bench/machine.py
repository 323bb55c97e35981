"""The machine a run measured: card, driver, CPU, core count, library versions, date, load."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

import aepg_kernels as ak
from aepg_kernels import utils
from aepg_kernels.backends import triton_interpreter


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def gpu_info(device: torch.device) -> Dict[str, object]:
    props = torch.cuda.get_device_properties(device)
    return {
        "card": props.name,
        "memory_bytes": props.total_memory,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "driver": nvidia_driver(),
        "cuda": torch.version.cuda,
    }


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def describe(device: torch.device) -> Dict[str, object]:
    """Everything needed to compare this run with another: JSON-ready."""
    info: Dict[str, object] = {
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        **utils.environment("liger-kernel"),  # python, torch, aepg_kernels, liger_kernel
        "triton": triton_version(),  # imported: its distribution is named pytorch-triton on some installs
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "available_backends": list(ak.available_backends()),
        "triton_interpret": triton_interpreter(),
    }
    if device.type == "cuda":
        info.update(gpu_info(device))
    return info


def title(info: Dict[str, object]) -> str:
    """One line naming the machine, for the terminal and the plot."""
    if info.get("card"):
        return f"{info['card']} (driver {info.get('driver')}), torch {info['torch']}, {info['date'][:10]}"
    return f"{info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, {info['date'][:10]}"
