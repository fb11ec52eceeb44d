"""A device runner for a qrobust export, here with ONNX Runtime: the template for any runtime or board.

It needs numpy and the runtime, never qrobust. For every batch the manifest lists, it loads the inputs
(float32, NCHW, already preprocessed), runs the model, and writes the logits as float32 under the
batch's name in the output folder; then it copies the manifest there. Replace ``run`` with your device's
call (a TensorRT engine, an ExecuTorch program, a vendor SDK) and keep the rest.

    python run_onnxruntime.py EXPORT_DIR MODEL.onnx OUTPUT_DIR [--threads N] [--no-optimize]

``--threads 1 --no-optimize`` runs the model as another host might (one thread, ONNX Runtime's graph
optimizations off): two output folders of one export then make a device matrix.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    parser.add_argument("--no-optimize", action="store_true", help="run the graph as written (no graph optimizations)")
    args = parser.parse_args()
    manifest = json.loads((args.export / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    if args.no_optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    for case in manifest["cases"]:
        for batch in case["batches"]:
            inputs = np.load(args.export / batch["inputs"], allow_pickle=False)
            target = args.output / batch["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, run(inputs).astype(np.float32))
    shutil.copy(args.export / "manifest.json", args.output / "manifest.json")


if __name__ == "__main__":
    main()
