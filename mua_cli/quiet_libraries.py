"""What the libraries may print in a process of the `mua` command (its own, and the sweep's worker processes,
which import this first: sweep/pool.py SLOT_IMPORTS): no download progress bars, no deprecation chatter;
mua's own lines say what matters."""

import os
import warnings

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not for users
