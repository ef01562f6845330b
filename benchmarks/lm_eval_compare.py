"""Does lm-eval's `local-completions` model, pointed at sageserve, score like lm-eval's `hf` model?

Reads lm-eval `--log_samples` outputs of one multiple-choice task (a reference run, usually
`hf`, and one or more other runs) and compares them per question: the chosen answer (argmax
loglikelihood, and argmax of loglikelihood per character as acc_norm does), every choice's
loglikelihood (max |Δ|) and its is_greedy flag. `--write-task DIR` writes the 30-question task
used for benchmarks/results/lm_eval_local_completions-cpu-2026-12-04.json.

Reproduce the whole check (lm-eval in its own venv; every heavy step under `nice -n 19`):

    python3 -m venv /work/lmeval_venv
    /work/lmeval_venv/bin/pip install torch==2.13.0 "lm-eval[hf,api]==0.4.13"
    .venv/bin/sageserve convert smollm2-135m-instruct /tmp/smollm2-hf
    python benchmarks/lm_eval_compare.py --write-task /tmp/lmeval_task
    nice -n 19 .venv/bin/python -m sageserve.launch_server --model-path smollm2-135m-instruct \
        --device cpu --dtype float32 --port 30111 --context-length 2048 &
    # once GET http://127.0.0.1:30111/health answers 200:
    TASK="--tasks tiny_mc --include_path /tmp/lmeval_task --batch_size 1 --seed 1234 --log_samples"
    URL=base_url=http://127.0.0.1:30111/v1/completions,model=smollm2-135m-instruct
    OPTS=tokenized_requests=True,num_concurrent=1,max_retries=1
    nice -n 19 /work/lmeval_venv/bin/lm_eval --model hf --device cpu \
        --model_args pretrained=/tmp/smollm2-hf,dtype=float32 $TASK --output_path /tmp/lmeval_out/hf
    nice -n 19 /work/lmeval_venv/bin/lm_eval --model local-completions $TASK \
        --model_args $URL,tokenizer=/tmp/smollm2-hf,$OPTS --output_path /tmp/lmeval_out/lc
    nice -n 19 /work/lmeval_venv/bin/lm_eval --model local-completions $TASK \
        --model_args $URL,tokenizer=/tmp/smollm2-hf,tokenizer_backend=huggingface,$OPTS \
        --output_path /tmp/lmeval_out/lc-hf-tokenizer
    nice -n 19 /work/lmeval_venv/bin/lm_eval --model local-completions $TASK \
        --model_args $URL,$OPTS --output_path /tmp/lmeval_out/lc-remote-tokenizer
    python benchmarks/lm_eval_compare.py /tmp/lmeval_out/hf /tmp/lmeval_out/lc \
        /tmp/lmeval_out/lc-hf-tokenizer /tmp/lmeval_out/lc-remote-tokenizer --out cmp.json

lm-eval 0.4.13's local-completions picks tokenizer_backend=remote by itself whenever the server
answers /tokenizer_info (sageserve does), even with tokenizer= given: it then tokenizes with
that local tokenizer's encode() under the remote backend's code path. Only
tokenizer_backend=huggingface gives its plain Hugging Face path, hence the third run.

A run is given as its --output_path folder (the one samples_*.jsonl is searched for below it) or
as the samples file itself. Exit status 1 when any run's chosen answers differ from the first's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# (question, four choices, index of the right one); written for this check.
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("What is the capital of Japan?", ["Seoul", "Tokyo", "Beijing", "Bangkok"], 1),
    ("What is the capital of Italy?", ["Milan", "Naples", "Rome", "Venice"], 2),
    ("What is the capital of Germany?", ["Munich", "Hamburg", "Frankfurt", "Berlin"], 3),
    ("What is the capital of Spain?", ["Madrid", "Barcelona", "Lisbon", "Seville"], 0),
    ("What is the capital of Canada?", ["Toronto", "Ottawa", "Vancouver", "Montreal"], 1),
    ("What is the capital of Egypt?", ["Alexandria", "Giza", "Cairo", "Luxor"], 2),
    ("What is the capital of Russia?", ["Kiev", "Minsk", "Warsaw", "Moscow"], 3),
    ("What is the capital of the United Kingdom?", ["London", "Dublin", "Edinburgh", "Paris"], 0),
    ("What is the capital of Australia?", ["Sydney", "Canberra", "Melbourne", "Perth"], 1),
    ("What is 2 + 2?", ["3", "5", "4", "6"], 2),
    ("What is 3 + 5?", ["7", "9", "10", "8"], 3),
    ("What is 10 - 3?", ["7", "6", "8", "5"], 0),
    ("What is 6 times 7?", ["36", "42", "48", "49"], 1),
    ("What is 9 + 1?", ["8", "11", "10", "19"], 2),
    ("What is 12 divided by 4?", ["4", "6", "2", "3"], 3),
    ("What is 5 times 5?", ["25", "20", "30", "10"], 0),
    ("What is 100 - 1?", ["101", "99", "90", "98"], 1),
    ("What colour is the sky on a clear day?", ["Green", "Red", "Blue", "Purple"], 2),
    ("What colour is grass?", ["Blue", "Orange", "Pink", "Green"], 3),
    ("What colour is snow?", ["White", "Black", "Red", "Brown"], 0),
    ("What colour is a ripe banana?", ["Blue", "Yellow", "Purple", "Grey"], 1),
    ("What colour do you get by mixing blue and yellow?", ["Red", "Orange", "Green", "Pink"], 2),
    ("What colour is coal?", ["White", "Yellow", "Pink", "Black"], 3),
    ("How many legs does a spider have?", ["Eight", "Six", "Four", "Ten"], 0),
    ("How many days are in a week?", ["Five", "Seven", "Six", "Ten"], 1),
    ("Which animal says meow?", ["Dog", "Cow", "Cat", "Duck"], 2),
    ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mars", "Mercury"], 3),
    ("What is frozen water called?", ["Ice", "Steam", "Sand", "Oil"], 0),
    ("How many months are in a year?", ["Ten", "Twelve", "Eleven", "Fourteen"], 1),
]


def write_task(folder: Path) -> None:
    """The task YAML and its JSON-lines questions, for lm-eval's --include_path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "questions.jsonl"
    with data.open("w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}))
            f.write("\n")
    (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data.resolve()))


def samples_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("samples_*.jsonl"))
    if len(found) != 1:
        raise SystemExit(f"{path}: expected one samples_*.jsonl below it, found {len(found)}")
    return found[0]


def load(path: Path) -> dict[int, dict]:
    """doc_id -> {"ll": [...], "greedy": [...], "choices": [...], "acc", "acc_norm"}."""
    docs = {}
    for line in samples_file(path).read_text().splitlines():
        s = json.loads(line)
        pairs = s["filtered_resps"]
        docs[s["doc_id"]] = {
            "ll": [float(ll) for ll, _ in pairs],
            "greedy": [str(g) == "True" for _, g in pairs],
            "choices": [s["arguments"][k]["arg_1"] for k in sorted(s["arguments"])],
            "acc": s["acc"],
            "acc_norm": s["acc_norm"],
        }
    return docs


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def answers(doc: dict) -> tuple[int, int]:
    """lm-eval's picks: by loglikelihood (acc) and by loglikelihood per character (acc_norm)."""
    per_char = [ll / len(c) for ll, c in zip(doc["ll"], doc["choices"], strict=True)]
    return argmax(doc["ll"]), argmax(per_char)


def scores(docs: dict[int, dict]) -> dict[str, float]:
    n = len(docs)
    return {m: sum(d[m] for d in docs.values()) / n for m in ("acc", "acc_norm")}


def compare(ref: dict[int, dict], other: dict[int, dict]) -> dict:
    if ref.keys() != other.keys():
        raise SystemExit("the runs hold different doc_ids")
    same = same_norm = greedy_same = n_choices = 0
    max_diff = 0.0
    worst = None
    for doc_id in sorted(ref):
        a, b = ref[doc_id], other[doc_id]
        pick_a, pick_b = answers(a), answers(b)
        same += pick_a[0] == pick_b[0]
        same_norm += pick_a[1] == pick_b[1]
        for i, (x, y) in enumerate(zip(a["ll"], b["ll"], strict=True)):
            n_choices += 1
            greedy_same += a["greedy"][i] == b["greedy"][i]
            if abs(x - y) > max_diff or worst is None:
                max_diff = max(max_diff, abs(x - y))
                worst = {"doc_id": doc_id, "choice": i, "ref": x, "other": y}
    n = len(ref)
    return {
        "same_answers": f"{same}/{n}",
        "same_answers_acc_norm": f"{same_norm}/{n}",
        "max_abs_loglikelihood_diff": max_diff,
        "max_diff_at": worst,
        "is_greedy_agree": f"{greedy_same}/{n_choices}",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="reference run first, then the others")
    p.add_argument("--write-task", type=Path, help="write the task YAML and questions here")
    p.add_argument("--out", type=Path, help="also write the comparison as JSON here")
    args = p.parse_args()
    if args.write_task:
        write_task(args.write_task)
        print(f"wrote {args.write_task}/tiny_mc.yaml and questions.jsonl")
    if not args.runs:
        return 0
    if len(args.runs) < 2:
        p.error("give a reference run and at least one other")
    ref_path, *others = args.runs
    ref = load(ref_path)
    report = {"reference": str(ref_path), "scores": {str(ref_path): scores(ref)}, "vs": {}}
    ok = True
    for path in others:
        docs = load(path)
        report["scores"][str(path)] = scores(docs)
        report["vs"][str(path)] = cmp = compare(ref, docs)
        ok &= cmp["same_answers"].split("/")[0] == cmp["same_answers"].split("/")[1]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
