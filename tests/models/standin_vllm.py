"""A stand-in for the `vllm` executable, for the VLLMBackend tests on machines without a GPU.

    standin_vllm.py serve MODEL_DIR --served-model-name NAME --host H --port P
        --gpu-memory-utilization X --max-model-len L [--standin-* test switches]

It checks its arguments the way the backend must pass them, then serves the OpenAI
protocol and /health with the instant server (gateway/instant.py). Test switches: start
late (--standin-delay S), exit at once (--standin-exit CODE), never become healthy
(--standin-never-healthy), and spawn a worker process that must die with it
(--standin-worker-pid-file PATH), like vLLM's engine processes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gpu-memory-utilization", type=float, required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--standin-delay", type=float, default=0.0)
    parser.add_argument("--standin-exit", type=int, default=None)
    parser.add_argument("--standin-never-healthy", action="store_true")
    parser.add_argument("--standin-worker-pid-file", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.model_dir.is_dir():
        parser.error(f"model directory {args.model_dir} does not exist")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        parser.error("--gpu-memory-utilization must be in (0, 1]")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    print(f"standin vllm: serving {args.model_dir} as {args.served_model_name}", flush=True)
    if args.standin_exit is not None:
        print("standin vllm: CUDA out of memory (simulated)", flush=True)
        return args.standin_exit
    if args.standin_worker_pid_file is not None:
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        args.standin_worker_pid_file.write_text(str(worker.pid))
    time.sleep(args.standin_delay)
    if args.standin_never_healthy:
        while True:
            time.sleep(1)
    from gateway.instant import serve

    serve(args.host, args.port, args.served_model_name, args.max_model_len)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
