#!/usr/bin/env bash
# scripts/study/sdmoe_study.py --quick end to end, run by ctest: both arms train, a second
# run skips the finished runs, the report holds a row per arm in every table, finite
# overlaps in [0, 1], and PNG plots; an unknown arm is refused.
#   study.sh REPO
set -uo pipefail
repo="$1"
cd "$repo"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
die() { echo "FAIL: $*"; exit 1; }
study=(/usr/bin/python3 scripts/study/sdmoe_study.py)

"${study[@]}" run --quick --out "$tmp/s" > "$tmp/run1.txt" 2>&1 || { cat "$tmp/run1.txt"; die "the quick study failed"; }
grep -q "2 run(s) done, 0 skipped" "$tmp/run1.txt" || { cat "$tmp/run1.txt"; die "expected 2 runs"; }
for arm in plain sdmoe; do
  [ -f "$tmp/s/runs/${arm}_lr1x_seed0/summary.json" ] || die "no summary for $arm"
  [ ! -e "$tmp/s/runs/${arm}_lr1x_seed0/checkpoints" ] || die "the $arm run's checkpoints were not removed"
done
"${study[@]}" run --quick --out "$tmp/s" > "$tmp/run2.txt" 2>&1 || die "the second quick study failed"
grep -q "0 run(s) done, 2 skipped" "$tmp/run2.txt" || { cat "$tmp/run2.txt"; die "finished runs were not skipped"; }
"${study[@]}" report "$tmp/s" > "$tmp/report.txt" 2>&1 || { cat "$tmp/report.txt"; die "report failed"; }
md="$tmp/s/results.md"
for arm in plain sdmoe; do
  [ "$(grep -c "^| 1x | $arm |" "$md")" -eq 3 ] || { cat "$md"; die "$arm lacks a row in one of the three tables"; }
done
for png in validation_loss overlap; do
  [ "$(head -c 4 "$tmp/s/results/$png.png" | od -An -tx1 | tr -d ' \n')" = "89504e47" ] || die "$png.png is not a PNG"
done
/usr/bin/python3 - "$tmp/s" <<'PYTHON' || die "the summaries are wrong"
import json, math, sys
for arm in ("plain", "sdmoe"):
    s = json.load(open("%s/runs/%s_lr1x_seed0/summary.json" % (sys.argv[1], arm)))
    assert s["steps"] == 20 and [st for st, _ in s["val_loss"]] == [10, 20], s["val_loss"]
    assert not s["diverged"] and s["val_loss"][-1][1] < s["val_loss"][0][1] + 1.0, s
    assert sorted(s["overlap"]) == ["10", "20"], sorted(s["overlap"])
    for step in s["overlap"].values():
        for left, right in step.values():
            assert 0 < left < 1 and 0 < right < 1, step
PYTHON
"${study[@]}" run --quick --arms plain,tied --out "$tmp/bad" > "$tmp/bad.txt" 2>&1 && die "an unknown arm was accepted"
grep -q "unknown arm(s) tied" "$tmp/bad.txt" || { cat "$tmp/bad.txt"; die "no clear error for an unknown arm"; }
echo "PASS: quick study: $(grep -c '^| 1x' "$md") table rows"
