#!/usr/bin/env python3
"""Which right answers of a ponder-arith fixed run were reached by a sound chain of steps?

    scripts/arith_process_check.py QUESTIONS.jsonl[.gz]   # from `ponder eval --sweep --questions-out`

pass@N counts a question if any sample's final answer is right. A sample can reach the right
answer through a wrong step (two slips that cancel, or a slip in a digit a later step drops);
a process reward model is trained to reject such a chain. A sample is *sound* here when every
step `a op b = c` is arithmetically right and starts from the previous step's result. The
table gives, per level, pass@N, pass@N counting sound samples only, PRM-max selection (on the
raw score, which the calibrated head orders the same way up to ties), and the share of right
samples that are unsound.
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


def main(path):
    levels = collections.defaultdict(lambda: {"questions": 0, "pass": 0, "sound": 0, "prm_max": 0,
                                              "right": 0, "unsound": 0})
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
        s["prm_max"] += max(c, key=lambda x: x["score"]["raw"])["correct"]
        s["right"] += len(right)
        s["unsound"] += sum(not sound(x["text"]) for x in right)
    print("| level | questions | pass@%d | pass@%d, sound samples only | PRM-max best-of-%d | right samples that are unsound |"
          % (n, n, n))
    print("|---|---|---|---|---|---|")
    total = collections.Counter()
    for level in sorted(levels):
        s = levels[level]
        total.update(s)
        print("| %s | %d | %.1f%% | %.1f%% | %.1f%% | %.1f%% |" % (level, s["questions"],
              100 * s["pass"] / s["questions"], 100 * s["sound"] / s["questions"],
              100 * s["prm_max"] / s["questions"], 100 * s["unsound"] / max(1, s["right"])))
    t = total
    print("| all | %d | %.1f%% | %.1f%% | %.1f%% | %.1f%% |" % (t["questions"], 100 * t["pass"] / t["questions"],
          100 * t["sound"] / t["questions"], 100 * t["prm_max"] / t["questions"],
          100 * t["unsound"] / max(1, t["right"])))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
