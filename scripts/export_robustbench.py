"""Export an evaluated checkpoint as a RobustBench submission, from eval.py's results.json.

    python scripts/export_robustbench.py <eval run>/results.json [--out DIR] [-- eval overrides]

The same files as ``python eval.py ... export=robustbench`` (``<out>/robustbench/``: the
``{"state_dict"}`` weights for RobustBench's WideResNet, the model card, the zoo entry), for an
evaluation that already wrote its card: the checkpoint, its ``weights`` choice and the card are
taken from ``results.json``; the checkpoint's SHA-256 must still match.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gkl.config import compose_config
from gkl.evaluate.export import export_robustbench, read_results
from gkl.evaluate.run import build_model, read_source, resolve_config
from gkl.stored_config import check_stored_config


def main(argv: list[str]) -> dict[str, str]:
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="results.json written by eval.py")
    parser.add_argument("--out", type=Path, default=None, help="default: beside results.json")
    args = parser.parse_args(argv)
    try:
        record = read_results(args.results)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    check_stored_config(record, str(args.results))  # a results.json never chooses code
    if not isinstance(record["checkpoint"], str):
        raise SystemExit(
            f"{args.results}: 'checkpoint' must be a path, got {record['checkpoint']!r}"
        )
    card_path = Path(record["model_card"])
    card = json.loads(card_path.read_text())
    check_stored_config(card, str(card_path))
    weights = record["weights"] if record["weights"] in ("ema", "model") else "auto"
    cfg = compose_config(
        "eval.yaml",
        [f"weights={weights}", "paths.output_dir=.", *overrides],
    )
    cfg.ckpt_path = record["checkpoint"]  # a value, never parsed as an override
    source = read_source(cfg)
    if source.sha256 != record["checkpoint_sha256"]:
        raise SystemExit(
            f"{record['checkpoint']} changed since {args.results} was written (SHA-256 differs): "
            "evaluate it again"
        )
    _, model_cfg = resolve_config(cfg, source)
    model, _ = build_model(model_cfg, source, weights)
    files = export_robustbench(
        model,
        architecture=record["architecture"],
        card=card,
        card_id=card_path.stem,
        threat_model=record["threat_model"],
        out_dir=args.out or args.results.parent,
    )
    for name, path in files.items():
        print(f"{name}: {path}")
    return files


if __name__ == "__main__":
    main(sys.argv[1:])
