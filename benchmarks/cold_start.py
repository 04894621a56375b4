# How long a cold `tinygptv ask` takes and where the time goes: N fresh processes of the real command (wall and CPU
# seconds, medians), then N fresh processes that time its phases alone: imports, loading, the first answer, and
# warm answers (a new image and question in the same process, as chat and serve answer).
"""Prints; asserts nothing. Conversions (SmolLM2's GGUF, an engine's) must already be cached: run the command once
before. Example (the numbers in the README and docs/quantization.md):

    python benchmarks/cold_start.py --runs 5
    python benchmarks/cold_start.py --runs 5 --backend openvino --quant int8
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

IMAGE = "examples/red_circle.png"
WARM_IMAGES = [f"examples/tiny-data/images/{name}.png" for name in ("blue_square", "green_circle", "yellow_square")]
QUESTION = "What color is the shape?"

# One fresh process: the phases of `ask`, each timed (wall and this process's CPU seconds).
PHASES = r"""
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out, wall, used = {}, time.perf_counter(), cpu()
def mark(name):
    global wall, used
    now, now_cpu = time.perf_counter(), cpu()
    out.setdefault(name, []).append([now - wall, now_cpu - used])
    wall, used = now, now_cpu
import tinygptv.cli
from tinygptv.checkpoint.loading import load_model
from tinygptv.serve.chat import ChatSession
mark("imports")
engine = {} if sys.argv[1] == "torch" else {"backend": sys.argv[1]}  # (runs on a tinygptv before --backend too)
model = load_model("tinygptv-nano", quant=sys.argv[2], quiet=True, **engine)
mark("load_model")
session = ChatSession(model)
session.set_image(sys.argv[3])
answer = session.ask(sys.argv[4], task="vqa")
mark("answer")
for image in sys.argv[5:]:  # warm answers: a new image and a question in the same process
    session.set_image(image)
    session.ask(sys.argv[4], task="vqa")
    mark("warm answer")
print(json.dumps(out))
"""


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--backend", default="torch")
    p.add_argument("--quant", default="none")
    args = p.parse_args()
    engine = [] if args.backend == "torch" else ["--backend", args.backend]
    command = [sys.executable, "-m", "tinygptv.cli", "ask", "--image", IMAGE, "--task", "vqa", *engine, "--quant",
               args.quant, QUESTION]
    walls, cpus, answers = [], [], set()
    for _ in range(args.runs):
        before, start = children_cpu(), time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - start)
        cpus.append(children_cpu() - before)
        answers.add(done.stdout.strip())
    print(f"tinygptv ask (backend {args.backend}, quant {args.quant}), {args.runs} fresh processes: "
          f"wall {statistics.median(walls):.2f} s, CPU {statistics.median(cpus):.2f} s (medians; walls "
          f"{', '.join(f'{w:.2f}' for w in walls)}); answers {sorted(answers)}")
    phases: dict[str, list] = {}
    for _ in range(args.runs):
        done = subprocess.run([sys.executable, "-c", PHASES, args.backend, args.quant, IMAGE, QUESTION,
                               *WARM_IMAGES], capture_output=True, text=True, check=True)
        for name, values in json.loads(done.stdout.strip().splitlines()[-1]).items():
            phases.setdefault(name, []).extend(values)
    for name, values in phases.items():
        print(f"  {name:11s} wall {statistics.median(v[0] for v in values):.2f} s, "
              f"CPU {statistics.median(v[1] for v in values):.2f} s (median of {len(values)})")


if __name__ == "__main__":
    main()
