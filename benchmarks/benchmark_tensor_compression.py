"""Throughput, wire size and error of every tensor compression, through the public API only.

    python benchmarks/benchmark_tensor_compression.py                  # 1M, 16M, 64M float32 elements
    python benchmarks/benchmark_tensor_compression.py --sizes 10M --repeats 5 --compressions UNIFORM_8BIT

Each row: one serialize_torch_tensor + deserialize_torch_tensor round trip of a N(0, 1) float32 tensor (best of
--repeats), throughput in GB/s of float32 input for compress, decompress and both, the serialized message size, the
max abs error and the relative RMS error. The "torch fp16 cast" row is the reference: tensor.to(float16) and back.
The same script runs under the original hivemind (it only uses hivemind.compression and runtime_pb2).
"""

import argparse
import gc
import platform
import time
from typing import Callable, List, Optional, Tuple

import torch

import hivemind
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto.runtime_pb2 import CompressionType


def parse_size(text: str) -> int:
    text = text.strip().upper()
    multiplier = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * multiplier)


def best_time(function: Callable[[], object], repeats: int) -> Tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def errors(restored: torch.Tensor, original: torch.Tensor) -> Tuple[float, float]:
    difference = restored.double() - original.double()
    max_abs = difference.abs().max().item()
    relative_rms = (difference.square().mean() / original.double().square().mean()).sqrt().item()
    return max_abs, relative_rms


def measure(tensor: torch.Tensor, compression: Optional[int], repeats: int) -> dict:
    if compression is None:  # reference: a plain dtype conversion there and back
        compress_time, half = best_time(lambda: tensor.to(torch.float16), repeats)
        decompress_time, restored = best_time(lambda: half.to(torch.float32), repeats)
        wire_bytes = half.numel() * half.element_size()
    else:
        compress_time, message = best_time(lambda: serialize_torch_tensor(tensor, compression), repeats)
        decompress_time, restored = best_time(lambda: deserialize_torch_tensor(message), repeats)
        wire_bytes = message.ByteSize()
    max_abs, relative_rms = errors(restored, tensor)
    return dict(
        compress=compress_time,
        decompress=decompress_time,
        wire_bytes=wire_bytes,
        max_abs=max_abs,
        relative_rms=relative_rms,
    )


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,16M,64M", help="comma-separated element counts (suffixes K, M, G)")
    parser.add_argument("--repeats", type=int, default=3, help="round trips per measurement (the best one counts)")
    parser.add_argument(
        "--compressions", default=",".join(CompressionType.keys()), help="comma-separated CompressionType names"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sizes = [parse_size(size) for size in args.sizes.split(",") if size]
    compressions = [CompressionType.Value(name.strip()) for name in args.compressions.split(",") if name.strip()]
    print(
        f"hivemind {hivemind.__version__} ({hivemind.__file__}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}, best of {args.repeats}"
    )
    header = (
        f"{'compression':<16}{'elements':>10}{'compress GB/s':>15}{'decompress GB/s':>17}{'total GB/s':>12}"
        f"{'round trip s':>14}{'wire MB':>10}{'ratio':>7}{'max abs err':>13}{'rel RMS err':>13}"
    )
    print(header)
    print("-" * len(header))
    for numel in sizes:
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        input_gb = tensor.numel() * 4 / 1e9
        for compression in [None] + compressions:
            name = "torch fp16 cast" if compression is None else CompressionType.Name(compression)
            try:
                row = measure(tensor, compression, args.repeats)
            except Exception as e:  # e.g. BLOCKWISE_8BIT without bitsandbytes in the original library
                print(f"{name:<16}{numel:>10}  failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            total = row["compress"] + row["decompress"]
            print(
                f"{name:<16}{numel:>10}{input_gb / row['compress']:>15.2f}{input_gb / row['decompress']:>17.2f}"
                f"{input_gb / total:>12.2f}{total:>14.4f}{row['wire_bytes'] / 1e6:>10.2f}"
                f"{row['wire_bytes'] / (numel * 4):>7.3f}{row['max_abs']:>13.2e}{row['relative_rms']:>13.2e}"
            )
        del tensor


if __name__ == "__main__":
    main()
