"""TPU working memory per row: the compiler's temporaries at chosen batches against model/cost.py.

Compiles extract's step deviceless with libtpu (model/aot.py, as `plan --topology` does) at each
--batch, one after another in this process, and prints per compile the compiler's figures and the
arithmetic's; with two or more batches also the slope (temporaries per row per chip), which is
what cost.row_bytes models. Needs the tpu extra. Each 7B compile takes ~15-25 s of CPU.

    .venv/bin/python bench/bench_tpu_memory.py --topology v4:2x2x1 --mesh 4,1 --layers 14 --batch 128 240
    .venv/bin/python bench/bench_tpu_memory.py --topology v5e:2x4 --mesh 8,1 --batch 256 480 632 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", required=True)
    p.add_argument("--model", default="Qwen2.5-7B", help="a plan preset")
    p.add_argument("--mesh", default="4,1", help="DATA,MODEL")
    p.add_argument("--layers", type=int, nargs="+", default=[14])
    p.add_argument("--hooks", nargs="+", default=["resid_post"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, nargs="+", required=True, help="global batch sizes to compile")
    p.add_argument("--json", action="store_true", help="one JSON object per compile")
    args = p.parse_args(argv)

    from llm_activations.commands import plan
    from llm_activations.model import aot, chips

    topology = chips.parse_topology(args.topology)
    devices = aot.topology_devices(topology)
    name, config = plan.preset_or_config(args.model)
    mesh = plan.parse_mesh(args.mesh)
    arithmetic = plan.make_plan(config, model_name=name, chip=plan.CHIP_PRESETS[topology.chip], layers=tuple(args.layers),
                                seq_len=args.seq_len, mesh=mesh, hooks=tuple(args.hooks), attention="splash")
    model_temp = sum(v for k, v in arithmetic.row_bytes.items() if k != "outputs")
    points = []
    for batch in args.batch:
        cpu = time.process_time()
        c = aot.compile_step(config, devices, layers=args.layers, hooks=args.hooks, batch_size=batch,
                             seq_len=args.seq_len, mesh_shape=mesh)
        rows = batch // mesh[0]
        rec = {"topology": topology.name, "model": name, "mesh": list(mesh), "layers": args.layers, "seq_len": args.seq_len,
               "batch": batch, "rows_per_chip": rows, "argument_bytes": c.argument_bytes, "output_bytes": c.output_bytes,
               "temp_bytes": c.temp_bytes, "peak_bytes": c.peak_bytes, "model_temp_bytes": rows * model_temp,
               "compile_seconds": round(c.compile_seconds, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
               "error": c.error}
        if c.temp_bytes is not None:
            points.append((rows, c.temp_bytes))
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            temp = "out of HBM" if c.temp_bytes is None else f"temporaries {c.temp_bytes:,} B ({c.temp_bytes / rows / 1e6:.2f} MB per row)"
            print(f"batch {batch} ({rows} per chip): {temp}; model {model_temp / 1e6:.2f} MB per row; "
                  f"compile {c.compile_seconds:.1f} s wall, {rec['cpu_seconds']} s CPU", flush=True)
    if len(points) >= 2:
        (r0, t0), (r1, t1) = points[0], points[-1]
        slope = (t1 - t0) / (r1 - r0)
        print(f"slope {slope / 1e6:.2f} MB per row per chip (intercept {(t0 - r0 * slope) / 1e6:.1f} MB); "
              f"model {model_temp / 1e6:.2f} MB ({model_temp / slope - 1:+.1%}); "
              f"lean (no residual term) {(model_temp - arithmetic.row_bytes['residual']) / 1e6:.2f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
