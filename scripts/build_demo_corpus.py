# Builds llm_activations/data/demo_corpus.jsonl: docstrings of the Python standard library
# (real English prose that ships with every Python), one JSON record per docstring.
# Usage: python3 scripts/build_demo_corpus.py llm_activations/data/demo_corpus.jsonl
import json, pkgutil, importlib, inspect, sys, warnings, hashlib
warnings.filterwarnings("ignore")
skip = {"antigravity","this","idlelib","tkinter","turtle","turtledemo","test","lib2to3","pydoc_data","ensurepip","venv","__main__"}
docs, seen = [], set()
for m in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
    if m.name.startswith("_") or m.name in skip or not m.ispkg and m.module_finder.path.find("site-packages")>=0:
        continue
    if "site-packages" in getattr(m.module_finder, "path", ""): continue
    try:
        with open("/dev/null","w") as null:
            mod = importlib.import_module(m.name)
    except Exception:
        continue
    objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", None) == mod.__name__]
    objs += [m for c in objs if inspect.isclass(c) for k, m in sorted(vars(c).items()) if not k.startswith("_") and inspect.isfunction(m)]
    for o in objs:
        d = inspect.getdoc(o)
        if not d or len(d) < 80: continue
        h = hashlib.sha1(d.encode()).hexdigest()
        if h in seen: continue
        seen.add(h)
        name = o.__name__ if o is mod else f"{mod.__name__}.{o.__qualname__}"
        docs.append({"id": name, "text": d})
from pydoc_data.topics import topics  # the language reference's prose, as pydoc shows it
for key in sorted(topics):
    docs.append({"id": f"reference.{key}", "text": topics[key]})
print(len(docs), sum(len(d["text"]) for d in docs), file=sys.stderr)
with open(sys.argv[1], "w") as f:
    for d in docs: f.write(json.dumps(d) + "\n")
