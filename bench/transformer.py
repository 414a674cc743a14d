"""The GPT on text: every chain method against backprop, on a fixed budget of steps.

``bench/methods_on_model.py`` on ``configs/charlm_gpt.yaml`` (a GPT-style decoder-only
transformer, one character per token) through the real runtime (one Ray actor per stage, one
torch thread each, torch.distributed transport): ``backprop`` on one actor, then ``pipeline``,
``dni``, ``cdni``, ``dgl`` (and any other ``--methods``) on K actors, each for the same number of
steps from the same seed; the held-out loss (nats and bits per character), the per-token
accuracy and the steady-state samples/s of each. The question: what synthetic gradients do to
transformer blocks on separate workers, against the true gradients of backprop and pipeline.

    PYTHONPATH=. .venv/bin/python bench/transformer.py --data-root data \\
        --json bench/results/transformer.json

Needs the fortune files (``make charlm-data``) under ``--data-root``, or a text file there.
"""

from __future__ import annotations

from pathlib import Path

from methods_on_model import BASELINE, main, parser

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "charlm_gpt.yaml"

if __name__ == "__main__":
    p = parser(config=CONFIG, backends=["ray"])
    p.set_defaults(methods=[BASELINE, "pipeline", "dni", "cdni", "dgl"])
    main(p.parse_args())
