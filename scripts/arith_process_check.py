#!/usr/bin/env python3
"""Which right answers of a ponder-arith fixed run were reached by a sound chain of steps?

    scripts/arith_process_check.py QUESTIONS.jsonl[.gz] [SPLIT.jsonl]
        # QUESTIONS from `ponder eval --sweep --questions-out`; SPLIT from
        # `ponder arith export` (the same split and --per-level) adds what went
        # wrong in the right answers of questions that only unsound chains solve

pass@N counts a question if any sample's final answer is right. A sample can reach the right
answer through wrong steps whose errors cancel (two slips, or a slip and a misread operand);
a process reward model is trained to reject such a chain. A sample is *sound* here when every
step `a op b = c` is arithmetically right and starts from the previous step's result. The
table gives, per level, pass@N, pass@N counting sound samples only, PRM-max selection as
`ponder eval` makes it (the calibrated median, ties to the answer text), the same on the raw
score (the calibrated head does not order candidates as the raw score does), and the share of
right samples that are unsound. A second table sets PRM-max beside answer-level aggregations:
the majority vote and votes weighted by the calibrated median or the raw score (each answer's
summed score, ties to the answer text).
"""
import collections
import gzip
import json
import re
import sys

STEP = re.compile(r"^\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


def sound(text):
    previous, steps = None, 0
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("The answer"):
            continue
        m = STEP.match(line)
        if not m:
            return False
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if {"+": a + b, "-": a - b, "*": a * b}[op] != c or (previous is not None and a != previous):
            return False
        previous, steps = c, steps + 1
    return steps > 0


def slips(text, numbers):
    """(wrong arithmetic steps, steps not starting from the previous result, operands
    that differ from the question's numbers in order) of one chain."""
    steps = [m for m in (STEP.match(line.strip()) for line in text.split("\n")) if m]
    arith = sum({"+": int(m[1]) + int(m[3]), "-": int(m[1]) - int(m[3]), "*": int(m[1]) * int(m[3])}[m[2]]
                != int(m[4]) for m in steps)
    chain = sum(int(steps[i][1]) != int(steps[i - 1][4]) for i in range(1, len(steps)))
    read = [int(steps[0][1])] + [int(m[3]) for m in steps] if steps else []
    misread = sum(a != b for a, b in zip(read, numbers)) + abs(len(read) - len(numbers))
    return arith, chain, misread


def lucky(path, split):
    """What went wrong in the right samples of questions no sound chain solves."""
    numbers = {}
    for line in open(split):
        q = json.loads(line)
        numbers[q["id"]] = [int(x) for x in re.findall(r"\d+", q["question"])]
    kinds, questions = collections.Counter(), collections.Counter()
    for line in (gzip.open if path.endswith(".gz") else open)(path, "rt"):
        q = json.loads(line)
        right = [x for x in q["candidates"] if x["correct"]]
        if not right or any(sound(x["text"]) for x in right):
            continue
        questions[q["level"]] += 1
        kinds.update(slips(x["text"], numbers[q["id"]]) for x in right)
    print()
    print("Questions solved by unsound chains only, by level: %s" % dict(sorted(questions.items())))
    print("| wrong arithmetic steps | broken links | misread operands | right samples |")
    print("|---|---|---|---|")
    for (a, c, m), n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print("| %d | %d | %d | %d |" % (a, c, m, n))


def prm_max(candidates, score):
    """The served PRM-max choice: each answer's best score, the highest first, ties by answer text."""
    return min(candidates, key=lambda x: (-score(x), x["answer"]))


def main(path):
    levels = collections.defaultdict(lambda: {"questions": 0, "pass": 0, "sound": 0, "prm_max": 0,
                                              "raw_max": 0, "right": 0, "unsound": 0})
    n = 0
    for line in (gzip.open if path.endswith(".gz") else open)(path, "rt"):
        q = json.loads(line)
        c = q["candidates"]
        n = max(n, len(c))
        right = [x for x in c if x["correct"]]
        s = levels[q["level"]]
        s["questions"] += 1
        s["pass"] += bool(right)
        s["sound"] += any(sound(x["text"]) for x in right)
        s["prm_max"] += prm_max(c, lambda x: x["score"]["quantiles"]["q50"])["correct"]
        s["raw_max"] += prm_max(c, lambda x: x["score"]["raw"])["correct"]
        s["right"] += len(right)
        s["unsound"] += sum(not sound(x["text"]) for x in right)
    print("| level | questions | pass@%d | pass@%d, sound samples only | PRM-max best-of-%d | on the raw score"
          " | right samples that are unsound |" % (n, n, n))
    print("|---|---|---|---|---|---|---|")
    total = collections.Counter()
    for level in sorted(levels):
        s = levels[level]
        total.update(s)
        print("| %s | %d | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f%% |" % (level, s["questions"],
              100 * s["pass"] / s["questions"], 100 * s["sound"] / s["questions"],
              100 * s["prm_max"] / s["questions"], 100 * s["raw_max"] / s["questions"],
              100 * s["unsound"] / max(1, s["right"])))
    t = total
    print("| all | %d | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f%% |" % (t["questions"],
          100 * t["pass"] / t["questions"], 100 * t["sound"] / t["questions"], 100 * t["prm_max"] / t["questions"],
          100 * t["raw_max"] / t["questions"], 100 * t["unsound"] / max(1, t["right"])))


def vote(candidates, weight):
    """The answer with the highest summed weight, ties by answer text; whether it is right."""
    total = collections.Counter()
    for x in candidates:
        total[x["answer"]] += weight(x)
    chosen = min(total, key=lambda a: (-total[a], a))
    return any(x["correct"] and x["answer"] == chosen for x in candidates)


def selectors(path):
    """Accuracy by level of PRM-max against answer-level votes over the same candidates."""
    rules = {
        "PRM-max": lambda c: prm_max(c, lambda x: x["score"]["quantiles"]["q50"])["correct"],
        "majority vote": lambda c: vote(c, lambda x: 1.0),
        "vote weighted by the calibrated median": lambda c: vote(c, lambda x: x["score"]["quantiles"]["q50"]),
        "vote weighted by the raw score": lambda c: vote(c, lambda x: x["score"]["raw"]),
    }
    levels = collections.defaultdict(collections.Counter)
    for line in (gzip.open if path.endswith(".gz") else open)(path, "rt"):
        q = json.loads(line)
        s = levels[q["level"]]
        s["questions"] += 1
        s["pass"] += any(x["correct"] for x in q["candidates"])
        for name, rule in rules.items():
            s[name] += rule(q["candidates"])
    levels["all"] = sum(levels.values(), collections.Counter())
    print()
    print("| level | pass@N | %s |" % " | ".join(rules))
    print("|---|---|%s" % ("---|" * len(rules)))
    for level, s in levels.items():
        print("| %s | %s |" % (level, " | ".join("%.1f%%" % (100 * s[k] / s["questions"])
                                                  for k in ["pass", *rules])))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1])
    selectors(sys.argv[1])
    if len(sys.argv) == 3:
        lucky(sys.argv[1], sys.argv[2])
