"""TensorBoard's own reading of a run directory: the scalar curves
`tensorboard --logdir` shows, as JSON {tag: [[step, value], ...]} (values in
the order read; NaN and infinities as the strings "nan", "inf", "-inf", so the
output stays strict JSON). Checks every events file on the way: TensorBoard's
record reader must get through the whole file (a bad length or CRC stops it
early), and the file's first event must declare file_version brain.Event:2.

Usage: python tensorboard_read.py RUN_DIR [OUT_JSON]
Prints the JSON, or writes it to OUT_JSON.
"""
import glob
import json
import math
import os
import sys

from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2


def check_file(path):
    records = list(event_file_loader.RawEventFileLoader(path).Load())
    read = sum(len(r) + 16 for r in records)  # length, 2 CRCs and the data
    size = os.path.getsize(path)
    if read != size:
        sys.exit(f"{path}: TensorBoard read {read} of {size} bytes")
    first = event_pb2.Event.FromString(records[0])
    if first.file_version != "brain.Event:2":
        sys.exit(f"{path}: first event has file_version {first.file_version!r}")


def number(x):
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def main():
    run = sys.argv[1]
    files = sorted(glob.glob(os.path.join(run, "events.out.tfevents.*")))
    if not files:
        sys.exit(f"{run}: no events files")
    for f in files:
        check_file(f)
    acc = EventAccumulator(run, size_guidance={"scalars": 0})  # 0: keep all
    acc.Reload()
    curves = {tag: [[e.step, number(e.value)] for e in acc.Scalars(tag)]
              for tag in acc.Tags()["scalars"]}
    text = json.dumps(curves, sort_keys=True)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
