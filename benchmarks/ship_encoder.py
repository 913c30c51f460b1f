"""Makes, or checks, the embedded encoder shipped inside the package (mua_cli/embedded/encoder-HASH/): the text
encoder `--task seq-cls` uses when no model is named (mua_cli/train/encoder.py).

    nice python benchmarks/ship_encoder.py           # pretrain (masked-LM, CPU, seeded) and write the folder
    nice python benchmarks/ship_encoder.py --check   # pretrain again and compare, bit for bit, with what is shipped

The weights are what `encoder.model_folder` would pretrain and cache where none are shipped. Pretraining on the
CPU is seeded and deterministic on one machine; another CPU or torch may round differently, and `--check` says
whether it does. It prints the masked-LM loss at the start and the end, and the held-out masked-byte accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ship_embedded import replace_folder  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from mua_cli.train import encoder  # noqa: E402


def masked_accuracy(model, n_batches: int = 20) -> float:
    """Share of masked bytes the model gets right, on windows drawn with another seed than pretraining's."""
    g = torch.Generator().manual_seed(12345)
    data, n = encoder.corpus_ids(), int(encoder.PRETRAIN["seq_len"])
    right = total = 0
    with torch.no_grad():
        for _ in range(n_batches):
            starts = torch.randint(0, len(data) - n, (16,), generator=g).tolist()
            body = torch.stack([data[s : s + n] for s in starts])
            ids = torch.cat([torch.full((16, 1), encoder.BOS), body, torch.full((16, 1), encoder.EOS)], dim=1)
            inputs, labels = encoder.mask_batch(ids, g)
            pred = model(input_ids=inputs).logits.argmax(-1)
            keep = labels != -100
            right += int((pred[keep] == labels[keep]).sum())
            total += int(keep.sum())
    return right / max(total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped weights; write nothing")
    args = ap.parse_args()

    from safetensors.torch import load_file

    folder = encoder.SHIPPED_DIR / encoder.folder_name()
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()

    def step(i: int, loss: float) -> None:
        losses.append(loss)
        if (i + 1) % 100 == 0:
            print(f"step {i + 1}: masked-LM loss {sum(losses[-100:]) / 100:.3f}", flush=True)

    model = encoder.pretrain(on_step=step)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    head, tail = sum(losses[:20]) / 20, sum(losses[-50:]) / 50
    print(
        f"pretrained {len(losses)} steps in {wall:.0f} s ({cpu:.0f} s CPU, one thread); "
        f"masked-LM loss {head:.2f} (first 20 steps) -> {tail:.2f} (last 50); "
        f"held-out masked-byte accuracy {masked_accuracy(model):.1%}"
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if args.check:
        shipped = load_file(str(folder / "model.safetensors"))
        common = set(shipped) & set(state)
        same = all(torch.equal(shipped[k], state[k]) for k in common) and common
        diff = max((shipped[k] - state[k]).abs().max().item() for k in common) if common else None
        print(f"{folder}: {'equal, bit for bit' if same else f'DIFFERENT (largest difference {diff})'}")
        return 0 if same else 1
    replace_folder(folder, lambda tmp: encoder.save(model, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
