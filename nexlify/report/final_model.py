"""The final model of a pipeline stepped through its validation and test windows again: the one part of
report.html that needs torch, run as a process of its own so that the controller, which draws the page,
never imports torch (controller.report starts it and reads its JSON).

    python -m nexlify.report.final_model MODEL DATA_DIR OUT_JSON [--name NAME]

MODEL: the checkpoint; DATA_DIR: the pipeline's data snapshot; OUT_JSON: where the evaluation section's
data (nexlify.report.evaluation) is written; NAME: how error messages name the model (its URL). Events
go to stderr as JSON lines; a failure is a `failed` event with its one-line error, exit code 2 for bad
input and 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

BASELINES_FOLDER = "baselines"  # in DATA_DIR: the baselines the pipeline's runs stored (controller.report copies them)


def evaluate_final_model(model_path: str, data_dir: str, name: str) -> dict:
    """The final model over the validation and test windows of the snapshot in data_dir, with the model's
    own config and normaliser; the baselines the pipeline's runs stored (copied into data_dir/baselines,
    nexlify.evaluation.FolderBaselines) are reused, the others computed and left there."""
    import torch

    from nexlify import checkpoint
    from nexlify.agent import build_model
    from nexlify.data.prepare import prepare_data
    from nexlify.env.market import MarketTensors
    from nexlify.evaluation import FolderBaselines
    from nexlify.features import Normalizer
    from nexlify.report import evaluation

    ckpt = checkpoint.load(model_path, map_location=torch.device("cpu"), name=name)
    cfg = checkpoint.train_config(ckpt, name)
    torch.set_num_threads(cfg.threads)  # as the pipeline's validation ran (nexlify.evaluate_cmd.set_threads)
    market, windows = prepare_data(cfg, data_dir)
    tensors = MarketTensors.build(market, Normalizer.from_dict(ckpt["normalizer"]), "cpu")
    model = build_model(cfg.agent, tensors.n_features, ckpt["model_state_dict"])
    named = {"validation": windows.val}
    if windows.test:
        named["test"] = windows.test
    return evaluation(model, tensors, named, cfg, title="The final model on the validation and test windows",
                      stored_baselines=FolderBaselines(os.path.join(data_dir, BASELINES_FOLDER)))


def _plain(obj):
    """numpy scalars and arrays as the Python numbers and lists they hold (the page reads them so too)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_result(compute, out_json: str) -> int:
    """The report's child processes end here: `compute()`'s result as JSON in `out_json`, exit code 0; a
    NexlifyError as one JSON `failed` event on stderr (which controller.report relays as its error), exit
    code 2 for bad input, 1 otherwise."""
    from nexlify import logs
    from nexlify.errors import InputError, NexlifyError

    logs.configure("json")
    try:
        result = compute()
        with open(out_json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, default=_plain)
    except NexlifyError as exc:
        import structlog

        structlog.get_logger("nexlify.report").error("failed", error=str(exc))
        return 2 if isinstance(exc, InputError) else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nexlify.report.final_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data_dir")
    parser.add_argument("out_json")
    parser.add_argument("--name", default=None, help="the model's name in error messages (default: MODEL)")
    args = parser.parse_args(argv)
    return write_result(lambda: evaluate_final_model(args.model, args.data_dir, args.name or args.model), args.out_json)


if __name__ == "__main__":
    sys.exit(main())
