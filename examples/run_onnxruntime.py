"""A device runner for a qrobust export, here with ONNX Runtime: the template for any runtime or board.

It needs numpy and the runtime, never qrobust. For every batch the manifest lists, it loads the inputs
(float32, NCHW, already preprocessed), runs the model, and writes the logits as float32 under the
batch's name in the output folder; then it copies the manifest there. Replace ``run`` with your device's
call (a TensorRT engine, an ExecuTorch program, a vendor SDK) and keep the rest.

    python run_onnxruntime.py EXPORT_DIR MODEL.onnx OUTPUT_DIR [--threads N] [--no-optimize] [--layer NAME=TENSOR]

``--layer NAME=TENSOR`` also records the graph tensor TENSOR of every batch as
``<case>/batch-NNNNN@NAME.npy`` (NAME URL-quoted): the pair's ``target_layer: NAME`` then gets EigenCAM
maps from the device's own activations.

``--threads 1 --no-optimize`` runs the model as another host might (one thread, ONNX Runtime's graph
optimizations off): two output folders of one export then make a device matrix.
"""
import argparse
import json
import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import onnx
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    parser.add_argument("--no-optimize", action="store_true", help="run the graph as written (no graph optimizations)")
    parser.add_argument("--layer", action="append", default=[], metavar="NAME=TENSOR",
                        help="also record the graph tensor TENSOR as layer NAME")
    args = parser.parse_args()
    layers = [tuple(spec.split("=", 1)) if "=" in spec else (spec, spec) for spec in args.layer]
    model = onnx.load(str(args.model))
    for _, tensor in layers:  # an intermediate tensor becomes an extra output of the graph
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    manifest = json.loads((args.export / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    if args.no_optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> list[np.ndarray]:
        """The logits, then each recorded layer's tensor."""
        return session.run(None, {name: batch})

    for case in manifest["cases"]:
        for batch in case["batches"]:
            inputs = np.load(args.export / batch["inputs"], allow_pickle=False)
            target = args.output / batch["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            logits, *tensors = run(inputs)
            np.save(target, logits.astype(np.float32))
            for (layer, _), values in zip(layers, tensors[-len(layers):] if layers else []):
                np.save(target.with_name(f"{target.stem}@{quote(layer, safe='')}.npy"), values.astype(np.float32))
    shutil.copy(args.export / "manifest.json", args.output / "manifest.json")


if __name__ == "__main__":
    main()
