#!/usr/bin/env python3
"""Markdown tables for reports/ponder-arith/README.md from `ponder eval --json` outputs.

    scripts/arith_report_tables.py sweep SWEEP.json     # fixed, pass@N, rules, equal tokens, per level
    scripts/arith_report_tables.py run RUN.json...      # runs through the reasoning runtime
    scripts/arith_report_tables.py chosen CALIB.json[,CALIB2.json...] TEST.json
        # points chosen on calib (several sweeps of calib questions pooled; within a point
        # means on the pool and on each sweep alone), read on test
    scripts/arith_report_tables.py beam QUESTIONS.jsonl[.gz]|SWEEP.json FIXED_BEAM.json RUN.json...
        # beam runs against the fixed beam and fixed best-of-N_max on the same questions
"""
import gzip
import json
import random
import sys


def pct(x):
    return "%.1f%%" % (100 * x)


def ci(c):
    return "[%.1f, %.1f]" % (100 * c[0], 100 * c[1])


FAMILIES = [("ias", "calibrated"), ("ias", "raw"), ("ias", "oracle"),
            ("sequential", "calibrated"), ("sequential", "raw"), ("sequential", "oracle"),
            ("give_up", "calibrated"), ("give_up", "raw"), ("give_up", "oracle"),
            ("vote", "none")]


def families(points):
    out = {}
    for p in points:
        if p["rule"] is not None:
            out.setdefault((p["rule"], p["estimator"]), []).append(p)
    return out


def sweep(d):
    pts = d["points"]
    n_max = d["max_samples"]
    fixed = [p for p in pts if p["rule"] is None]
    top = next(f for f in fixed if f["max_samples"] == n_max)
    pass_at = {x["n"]: x for x in d["pass_at"]}
    print("| N | fixed best-of-N | 95%% interval | pass@N | 95%% interval | mean tokens | tokens vs N=%d |" % n_max)
    print("|---|---|---|---|---|---|---|")
    for f in fixed:
        n = f["max_samples"]
        p = pass_at[n]
        print("| %d | %s | %s | %s | %s | %.0f | %s |" % (n, pct(f["accuracy"]), ci(f["accuracy_ci"]),
              pct(p["accuracy"]), ci(p["accuracy_ci"]), f["mean_generated_tokens"], pct(f["tokens_vs_fixed_max"])))
    fams = families(pts)
    print()
    print("| rule | estimator | cheapest point within 1 point of fixed N=%d | accuracy | 95%% interval | tokens vs N=%d |"
          % (n_max, n_max))
    print("|---|---|---|---|---|---|")
    for key in FAMILIES:
        v = fams.get(key)
        if not v:
            continue
        ok = [p for p in v if p["accuracy"] >= top["accuracy"] - 0.01 - 1e-9]
        if ok:
            b = min(ok, key=lambda p: (p["tokens_vs_fixed_max"], -p["accuracy"]))
            label = b["label"]
        else:
            b = max(v, key=lambda p: (p["accuracy"], -p["tokens_vs_fixed_max"]))
            label = "none; most accurate: " + b["label"]
        print("| %s | %s | %s | %s | %s | %s |" % (key[0], key[1], label, pct(b["accuracy"]),
              ci(b["accuracy_ci"]), pct(b["tokens_vs_fixed_max"])))
    cols = [k for k in FAMILIES if k in fams]
    print()
    print("| fixed N | tokens | fixed (95% interval) | " + " | ".join(
        "%s %s" % (r, "" if e == "none" else e) for r, e in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for f in fixed:
        budget = f["tokens_vs_fixed_max"]
        row = []
        for k in cols:
            ok = [p for p in fams[k] if p["tokens_vs_fixed_max"] <= budget + 1e-9]
            row.append(pct(max(p["accuracy"] for p in ok)) if ok else "-")
        print("| %d | %s | %s %s | " % (f["max_samples"], pct(budget), pct(f["accuracy"]), ci(f["accuracy_ci"]))
              + " | ".join(row) + " |")
    if d.get("per_level"):
        print()
        print("| level | questions | pass@%d | fixed best-of-%d | share of its tokens |" % (n_max, n_max))
        print("|---|---|---|---|---|")
        for lv in d["per_level"]:
            print("| %s | %s | %s | %s | %s |" % (lv["level"], lv["questions"], pct(lv["pass_accuracy"]),
                  pct(lv["fixed_accuracy"]), pct(lv["token_share"])))


def runs(paths):
    print("| run | rule | C | accuracy | mean samples | mean tokens | budget fraction | gave up |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        d = json.load(open(path))
        qs = d.get("questions", [])
        gave_up = sum(1 for q in qs if q.get("stop") == "gave_up")
        rule = d.get("budget_rule") if d.get("adaptive") else "fixed"
        print("| %s | %s | %s | %s | %.2f | %.0f | %s | %d |" % (path.split("/")[-1], rule, d.get("confidence"),
              pct(d["accuracy"]), d["mean_samples"], d["mean_generated_tokens"], pct(d["budget_fraction"]), gave_up))
    for path in paths:
        d = json.load(open(path))
        print()
        print("`%s` by level:" % path.split("/")[-1])
        print()
        print("| level | accuracy | mean samples | mean tokens | budget fraction |")
        print("|---|---|---|---|---|")
        for lv in d["per_level"]:
            print("| %d | %s | %.2f | %.0f | %s |" % (lv["level"], pct(lv["accuracy"]), lv["mean_samples"],
                  lv["mean_generated_tokens"], pct(lv["budget_fraction"])))


def pool(sweeps):
    """Sweeps of disjoint question sets with the same grid as one sweep over all their questions."""
    if len(sweeps) == 1:
        return sweeps[0]
    assert len({d["max_samples"] for d in sweeps}) == 1, "the sweeps have different N_max"
    n = [d["questions"] for d in sweeps]
    total = sum(n)
    by_label = [{p["label"]: p for p in d["points"]} for d in sweeps]
    top_label = next(p["label"] for p in sweeps[0]["points"]
                     if p["rule"] is None and p["max_samples"] == sweeps[0]["max_samples"])
    top_tokens = sum(k * b[top_label]["mean_generated_tokens"] for k, b in zip(n, by_label)) / total
    points = []
    for p in sweeps[0]["points"]:
        if not all(p["label"] in b for b in by_label):
            continue
        # No interval: that needs the questions, which a sweep's points do not keep.
        q = {k: v for k, v in p.items() if k != "accuracy_ci"}
        q["questions"] = total
        for key in ("accuracy", "mean_generated_tokens"):
            q[key] = sum(k * b[p["label"]][key] for k, b in zip(n, by_label)) / total
        q["tokens_vs_fixed_max"] = q["mean_generated_tokens"] / top_tokens
        points.append(q)
    return dict(sweeps[0], questions=total, points=points)


def within_a_point_on_each(sweeps):
    """The labels within 1 point of fixed best-of-N_max on every one of `sweeps`."""
    labels = None
    for d in sweeps:
        top = next(p for p in d["points"] if p["rule"] is None and p["max_samples"] == d["max_samples"])
        near = {p["label"] for p in d["points"] if p["accuracy"] >= top["accuracy"] - 0.01 - 1e-9}
        labels = near if labels is None else labels & near
    return labels


def chosen(calibs, test):
    """Each choice made on the calib sweeps (pooled), and the same grid point on the test sweep.
    The points within 1 point must be so on the pooled calib and on each calib sweep alone."""
    calib = pool(calibs)
    each = within_a_point_on_each(calibs)
    by_label = {p["label"]: p for p in test["points"]}
    fixed = {p["max_samples"]: p for p in calib["points"] if p["rule"] is None}
    fixed_test = {p["max_samples"]: p for p in test["points"] if p["rule"] is None}
    top = fixed[calib["max_samples"]]
    calibrated = [p for p in calib["points"] if p["estimator"] == "calibrated"]
    rows = []
    near = [p for p in calibrated if p["accuracy"] >= top["accuracy"] - 0.01 - 1e-9 and p["label"] in each]
    confident = [p for p in near if p["confidence"] >= 0.9]
    for what, candidates in (("cheapest within 1 point of fixed N_max", near),
                       ("the same with C >= 0.9 (the default)", confident)):
        if candidates:
            rows.append((what, min(candidates, key=lambda p: (p["tokens_vs_fixed_max"], -p["accuracy"])), None))
    for n in sorted(fixed):
        if n in (1, calib["max_samples"]):
            continue
        ok = [p for p in calibrated if p["tokens_vs_fixed_max"] <= fixed[n]["tokens_vs_fixed_max"] + 1e-9]
        if ok:
            rows.append(("most accurate within fixed N=%d's tokens" % n,
                         max(ok, key=lambda p: (p["accuracy"], -p["tokens_vs_fixed_max"])), n))
    print("| chosen on calib | point | calib accuracy | calib tokens | test accuracy (95% interval) | test tokens | test fixed N |")
    print("|---|---|---|---|---|---|---|")
    for what, p, n in rows:
        t = by_label[p["label"]]
        f = fixed_test.get(n) if n else fixed_test[test["max_samples"]]
        print("| %s | %s | %s | %s | %s %s | %s | %s %s |" % (what, p["label"], pct(p["accuracy"]),
              pct(p["tokens_vs_fixed_max"]), pct(t["accuracy"]), ci(t["accuracy_ci"]),
              pct(t["tokens_vs_fixed_max"]), pct(f["accuracy"]), ci(f["accuracy_ci"])))


def bootstrap(correct, resamples=2000, seed=0):
    """The 95% percentile interval of the mean over questions."""
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return [means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]]


def beam(questions_path, fixed_path, paths):
    fixed = json.load(open(fixed_path))
    ids = {q["id"] for q in fixed["questions"]}
    if questions_path.endswith(".json"):
        # A sweep over exactly these questions: its fixed best-of-N_max point.
        sweep = json.load(open(questions_path))
        top = next(p for p in sweep["points"] if p["rule"] is None and p["max_samples"] == sweep["max_samples"])
        assert sweep["questions"] == len(ids), "the sweep has other questions than the beam runs"
        n, accuracy, interval, bon_tokens = sweep["max_samples"], top["accuracy"], top["accuracy_ci"], \
            top["mean_generated_tokens"]
    else:
        opener = gzip.open if questions_path.endswith(".gz") else open
        rows = [r for r in map(json.loads, opener(questions_path, "rt")) if r["id"] in ids]
        assert len(rows) == len(ids), "the questions file lacks some of the beam run's questions"
        correct = [max(r["candidates"], key=lambda c: c["score"]["quantiles"]["q50"])["correct"] for r in rows]
        n, accuracy, interval = len(rows[0]["candidates"]), sum(correct) / len(rows), bootstrap(correct)
        bon_tokens = sum(c["tokens"] for r in rows for c in r["candidates"]) / len(rows)
    print("Fixed best-of-%d on the same %d questions: %s %s, %.0f tokens."
          % (n, len(ids), pct(accuracy), ci(interval), bon_tokens))
    print()
    print("| run | rule | C | accuracy | 95% interval | mean tokens | vs fixed beam | vs best-of-N_max | gave up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in [fixed_path] + paths:
        d = json.load(open(path))
        correct = [q["correct"] for q in d["questions"]]
        adaptive = d.get("adaptive")
        rule = d.get("budget_rule") if adaptive else "fixed"
        gave_up = sum(1 for q in d["questions"] if q.get("stop") == "gave_up")
        print("| %s | %s | %s | %s | %s | %.0f | %s | %s | %d |" % (
            path.split("/")[-1], rule, d.get("confidence") if adaptive else "-",
            pct(d["accuracy"]), ci(bootstrap(correct)), d["mean_generated_tokens"],
            pct(d["mean_generated_tokens"] / fixed["mean_generated_tokens"]), pct(d["mean_generated_tokens"] / bon_tokens),
            gave_up))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("sweep", "run", "chosen", "beam"):
        sys.exit(__doc__)
    if sys.argv[1] == "sweep":
        sweep(json.load(open(sys.argv[2])))
    elif sys.argv[1] == "beam":
        beam(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif sys.argv[1] == "chosen":
        chosen([json.load(open(f)) for f in sys.argv[2].split(",")], json.load(open(sys.argv[3])))
    else:
        runs(sys.argv[2:])
