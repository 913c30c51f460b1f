"""Makes, or checks, the pretrained embedded weights shipped inside the package (mua_cli/embedded/), so that the
first `mua sweep` of recipes/tiny.yaml loads them instead of pretraining (models.shipped_folder).

    python benchmarks/ship_embedded.py           # pretrain as `mua sweep` would, and write mua_cli/embedded/NAME/
    python benchmarks/ship_embedded.py --check   # pretrain again and compare, bit for bit, with what is shipped

The weights are exactly what `models.load_embedded` would pretrain and cache on a cache miss: `models.pretrain`
on the recipe's settings (fp32, CPU, seeded), saved with `save_pretrained`. Pretraining on the CPU is
deterministic: on the machine that made them, a pretraining at one thread and the cache made at two were equal
bit for bit. Another CPU or torch may round differently; `--check` says whether it does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mua_cli.spec.recipe import load_recipe  # noqa: E402
from mua_cli.train.data import load_text_data  # noqa: E402
from mua_cli.train.models import (  # noqa: E402
    PRETRAIN_DEFAULTS,
    SHIPPED_DIR,
    embedded_config,
    embedded_settings,
    pretrain,
    shipped_name,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tiny", help="recipe name or file (default: tiny)")
    ap.add_argument("--check", action="store_true", help="compare with the shipped weights; write nothing")
    args = ap.parse_args()

    from safetensors.torch import load_file

    recipe = load_recipe(args.recipe)
    pre = {**PRETRAIN_DEFAULTS, **recipe.model.pretrain}
    folder = SHIPPED_DIR / shipped_name(recipe.model, recipe.data.seq_len)
    t0 = time.perf_counter()
    model = pretrain(embedded_config(recipe.model), load_text_data(pre["data"], recipe.data.seq_len, 0.0), pre)
    print(f"pretrained {pre['steps']} steps in {time.perf_counter() - t0:.1f} s ({torch.get_num_threads()} threads)")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if args.check:
        shipped = load_file(str(folder / "model.safetensors"))
        same = set(shipped) == set(state) and all(torch.equal(shipped[k], state[k]) for k in state)
        diff = max((shipped[k] - state[k]).abs().max().item() for k in state) if set(shipped) == set(state) else None
        print(f"{folder}: {'equal, bit for bit' if same else f'DIFFERENT (largest difference {diff})'}")
        return 0 if same else 1

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "generation_config.json").unlink(missing_ok=True)  # the embedded model never generates
        (tmp / "settings.json").write_text(
            json.dumps(embedded_settings(recipe.model, recipe.data.seq_len), indent=1, sort_keys=True, default=str)
        )

    replace_folder(folder, write)
    return 0


def replace_folder(folder: Path, write) -> None:
    """`write(tmp)` fills a fresh folder beside `folder`, which then takes its place: a failed write leaves the
    shipped weights as they were."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"wrote {folder} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
